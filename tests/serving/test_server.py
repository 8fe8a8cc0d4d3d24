"""The OpenAI-compatible server, driven by the official ``openai`` client on SmolLM2 (CPU)."""

from __future__ import annotations

import argparse
import asyncio
import json

import httpx
import pytest
import torch

import llmspeed
from llmspeed import Generator, SamplingParams, lora
from llmspeed.serving import Engine
from llmspeed.serving.server import OpenAIServer

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "What is a Python list?"}]


def _server(model, adapters=(), api_key=None, **kw):
    return OpenAIServer(Engine(model, kv_cache_tokens=kw.pop("kv_cache_tokens", 8192), **kw), "smollm2", adapters, api_key)


def _client(url, key="none", **kw):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120, **kw)


def test_completions_and_chat_match_the_generator(smollm2, live_server):
    ref_gen = Generator(smollm2, progress=False)
    ref_chat = ref_gen.generate_batched([CHAT], SamplingParams(max_new_tokens=12))[0]
    ref_text = ref_gen.generate_batched(["The capital of France is"], SamplingParams(max_new_tokens=8))[0]
    with live_server(_server(smollm2)) as url:
        client = _client(url)
        assert [m.id for m in client.models.list().data] == ["smollm2"]
        chat = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=12, temperature=0)
        assert chat.choices[0].message.content == ref_chat.text
        assert chat.usage.prompt_tokens == len(ref_chat.prompt_token_ids)
        assert chat.usage.completion_tokens == len(ref_chat.token_ids)
        comp = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0)
        assert comp.choices[0].text == ref_text.text and comp.choices[0].finish_reason == "length"
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="smollm2", messages=CHAT, max_tokens=12, temperature=0, stream=True) if c.choices]
        assert "".join(pieces) == ref_chat.text
        stream = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8,
                                           temperature=0, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == ref_text.text
        assert chunks[-1].usage.completion_tokens == 8


def test_seeds_stops_logprobs_and_n(smollm2, live_server):
    with live_server(_server(smollm2)) as url:
        client = _client(url)
        kw = dict(model="smollm2", messages=CHAT, max_tokens=10, temperature=0.9, top_p=0.9)
        a = client.chat.completions.create(seed=7, **kw).choices[0].message.content
        b = client.chat.completions.create(seed=7, **kw).choices[0].message.content
        assert a == b
        two = client.chat.completions.create(seed=7, n=2, **kw)
        assert len(two.choices) == 2 and two.choices[0].message.content == a
        full = client.completions.create(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=12, temperature=0).choices[0].text
        stop = full.strip()[2:5]
        cut = client.completions.create(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[stop])
        assert cut.choices[0].text == full[: full.find(stop)] and cut.choices[0].finish_reason == "stop"
        lp = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=4, temperature=0,
                                            logprobs=True, top_logprobs=3)
        content = lp.choices[0].logprobs.content
        assert len(content) == 4 and all(len(t.top_logprobs) == 3 for t in content)
        assert all(t.logprob <= 0 and t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content)
        legacy = client.completions.create(model="smollm2", prompt="Hi", max_tokens=3, temperature=0, logprobs=2)
        assert len(legacy.choices[0].logprobs.token_logprobs) == 3


def _noisy_adapter(model, name, seed):
    lora.add_adapter(model, name, r=4)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            for pname, param in layer.named_parameters():
                if name in pname and "lora_B" in pname:
                    param.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed))


def test_two_adapters_in_one_concurrent_batch(smollm2, live_server, tmp_path):
    for name, seed in (("docs", 1), ("sql", 2)):
        _noisy_adapter(smollm2, name, seed)
    lora.set_adapter(smollm2, None)
    alone = {}
    for name in ("smollm2", "docs", "sql"):
        sp = SamplingParams(max_new_tokens=8, adapter=None if name == "smollm2" else name)
        alone[name] = Generator(smollm2, progress=False).generate_batched([CHAT], sp)[0].text
    assert len(set(alone.values())) == 3  # the adapters change the text
    with live_server(_server(smollm2, adapters=("docs", "sql"))) as url:
        assert {m.id for m in _client(url).models.list().data} == {"smollm2", "docs", "sql"}

        async def main():
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
            names = ["docs", "sql", "smollm2"] * 3
            outs = await asyncio.gather(*[client.chat.completions.create(model=n, messages=CHAT, max_tokens=8, temperature=0)
                                          for n in names])
            return names, [o.choices[0].message.content for o in outs]

        names, texts = asyncio.run(main())
        assert texts == [alone[n] for n in names]


def test_64_streaming_clients_with_10_disconnecting(smollm2, live_server):
    prompts = [f"Count to {i}:" for i in range(64)]
    expected = Generator(smollm2, progress=False).generate_batched(prompts, SamplingParams(max_new_tokens=6, ignore_eos=True))
    server = _server(smollm2, max_seqs=64)
    with live_server(server) as url:

        async def client_run(i, http):
            # min_tokens (an extension) keeps EOS away, so every complete stream has exactly 6 tokens
            body = {"model": "smollm2", "prompt": prompts[i], "max_tokens": 6 if i >= 10 else 500, "temperature": 0,
                    "stream": True, "min_tokens": 6 if i >= 10 else 0}
            text = ""
            async with http.stream("POST", f"{url}/v1/completions", json=body) as resp:
                assert resp.status_code == 200
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    text += json.loads(line[6:])["choices"][0]["text"]
                    if i < 10 and text:
                        return None  # disconnect midway
            return text

        async def main():
            async with httpx.AsyncClient(timeout=300) as http:
                return await asyncio.gather(*[client_run(i, http) for i in range(64)])

        texts = asyncio.run(main())
        for i in range(10, 64):
            assert texts[i] == expected[i].text, i
        engine = server.engine
        for _ in range(200):
            if engine.generator.num_live == 0:
                break
            asyncio.run(asyncio.sleep(0.05))
        assert engine.generator.num_live == 0
        assert engine.metrics()["kv_blocks_used"] == 0
        metrics = httpx.get(f"{url}/metrics").text
        assert "llmspeed_kv_blocks_used 0" in metrics and "llmspeed_generation_tokens_total" in metrics


def test_bad_requests_get_4xx_and_the_server_stays_up(smollm2, live_server):
    with live_server(_server(smollm2, api_key="sekret", kv_cache_tokens=2048)) as url:
        h = {"Authorization": "Bearer sekret"}
        post = lambda path, **kw: httpx.post(f"{url}{path}", headers=h, timeout=60, **kw)  # noqa: E731
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = post("/v1/completions", content=b"{not json")
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        r = post("/v1/completions", json={"model": "nope", "prompt": "hi"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = post("/v1/completions", json={"model": "smollm2", "prompt": "hi", "temperature": -1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
        r = post("/v1/completions", json={"model": "smollm2", "prompt": "hi", "frobnicate": 1})
        assert r.status_code == 400 and "frobnicate" in r.json()["error"]["message"]
        r = post("/v1/completions", json={"model": "smollm2", "prompt": "word " * 3000, "max_tokens": 2})
        assert r.status_code == 400 and "KV cache" in r.json()["error"]["message"]
        r = post("/v1/completions", json={"model": "smollm2", "prompt": "word " * 3000, "max_tokens": 2, "stream": True})
        assert r.status_code == 400
        r = post("/v1/chat/completions", json={"model": "smollm2", "messages": [], "max_tokens": 2})
        assert r.status_code == 400
        r = post("/v1/chat/completions", json={"model": "smollm2", "messages": CHAT, "n": 17, "stream": True})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        client = _client(url, key="sekret")
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="smollm2", prompt="hi", max_tokens=0)
        ok = client.completions.create(model="smollm2", prompt="hi", max_tokens=2)
        assert ok.usage.completion_tokens == 2
        assert httpx.get(f"{url}/health", headers=h).json() == {"status": "ok"}


def test_serve_cli_builds_a_quantized_server_with_an_adapter(tmp_path):
    from llmspeed.serving.cli import build, build_parser

    model = llmspeed.models.smollm2()
    lora.add_adapter(model, "docs", r=2)
    lora.save_adapter(model, tmp_path / "docs", "docs")
    args = build_parser().parse_args(["--quantize", "int8", "--adapter", f"docs={tmp_path / 'docs'}", "--port", "0"])
    engine, server = build(args)
    try:
        assert server.adapters == ("docs",) and server.model_name == "smollm2"
        assert type(engine.model.hf.model.layers[0].mlp.down_proj.base_layer).__name__ == "Int8Linear"
        assert args.host == "127.0.0.1"
    finally:
        engine.close()
    with pytest.raises(SystemExit, match="NAME=PATH"):  # build checks it too (argparse refuses it first: test_cli.py)
        build(argparse.Namespace(**{**vars(args), "adapter": ["nopath"]}))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_serve_cli_quantizes_the_output_head_at_int8_unless_told_not_to(fmt):
    """``--quantize`` puts the output head at int8 in every format (the tied embedding reads its rows), as
    llama.cpp's files do; ``--no-quantize-lm-head`` keeps it float, as ``llmspeed.quantize(..., lm_head=None)`` does."""
    from llmspeed.serving.cli import build, build_parser

    for flags, head in (([], "Int8Linear"), (["--quantize-lm-head"], "Int8Linear"), (["--no-quantize-lm-head"], "Linear")):
        engine, _ = build(build_parser().parse_args(["--quantize", fmt, *flags, "--port", "0"]))
        try:
            hf = engine.model.hf
            assert type(hf.lm_head).__name__ == head, flags
            body = {"int8": "Int8Linear", "int4": "Int4Linear"}[fmt]
            assert type(hf.model.layers[0].mlp.down_proj).__name__ == body
            assert (type(hf.model.embed_tokens).__name__ == "QuantizedEmbedding") == (head == "Int8Linear")
            out = engine.model.generate_batched([[1, 2, 3]], SamplingParams(max_new_tokens=2), progress=False)
            assert len(out[0].token_ids) == 2
        finally:
            engine.close()
    for flag in ("--quantize-lm-head", "--no-quantize-lm-head"):
        with pytest.raises(SystemExit, match=f"{flag} needs --quantize"):
            build(build_parser().parse_args([flag]))
    with pytest.raises(SystemExit, match="--activations int8 needs --quantize"):
        build(build_parser().parse_args(["--activations", "int8"]))


def test_serve_cli_passes_the_lora_dtype_to_the_fused_step():
    from llmspeed.generation import fused_decode
    from llmspeed.serving.cli import build, build_parser

    if fused_decode.unavailable() is not None:
        pytest.skip(f"the C++ decode kernel cannot build here: {fused_decode.unavailable()}")
    engine, _ = build(build_parser().parse_args(["--lora-dtype", "float32", "--port", "0"]))
    try:
        assert engine.generator.runner.fused.lora_dtype == torch.float32
    finally:
        engine.close()
    with pytest.raises(SystemExit):  # argparse names the choices
        build_parser().parse_args(["--lora-dtype", "bfloat16"])


def test_serve_cli_passes_the_kv_cache_dtype_to_the_cache():
    from llmspeed.serving.cli import build, build_parser

    engine, _ = build(build_parser().parse_args(["--kv-cache-dtype", "float16", "--kv-cache-tokens", "512", "--port", "0"]))
    try:
        assert engine.generator.cache.key.dtype == torch.float16
    finally:
        engine.close()
    with pytest.raises(SystemExit):  # argparse names the choices
        build_parser().parse_args(["--kv-cache-dtype", "int8"])


def test_serve_cli_passes_the_scheduler_steps_and_bursts_answer_as_single_steps():
    from llmspeed.serving.cli import build, build_parser

    outs = []
    for steps in ("1", "6"):
        engine, _ = build(build_parser().parse_args(["--num-scheduler-steps", steps, "--kv-cache-tokens", "1024", "--port", "0"]))
        try:
            assert engine.generator.num_scheduler_steps == int(steps)
            handles = [engine.submit(p, SamplingParams(max_new_tokens=14, ignore_eos=True)) for p in ("Hi", "What is 2+2?")]
            outs.append([h.result(timeout=120).token_ids for h in handles])
            assert (engine.generator.step_paths.get("fused cpu, greedy burst", (0, 0))[0] > 0) == (steps == "6")
        finally:
            engine.close()
    assert outs[0] == outs[1] and all(len(t) == 14 for t in outs[0])
    for bad in ("0", "-3", "two"):
        with pytest.raises(SystemExit):  # argparse names the option and the value
            build_parser().parse_args(["--num-scheduler-steps", bad])


def test_serve_cli_int8_activations_reach_every_quantized_layer():
    from llmspeed.serving.cli import build, build_parser

    engine, _ = build(build_parser().parse_args(["--quantize", "int4", "--activations", "int8", "--port", "0"]))
    try:
        layers = [m for n, m in engine.model.linear_layers() if n != "lm_head"]
        assert layers and all(m.config.activations == "int8" for m in layers)
        out = engine.model.generate_batched([[1, 2, 3]], SamplingParams(max_new_tokens=2), progress=False)
        assert len(out[0].token_ids) == 2
    finally:
        engine.close()


def test_serve_loads_transformers_and_llmspeed_folders(tmp_path):
    from llmspeed.serving.cli import load_model

    tiny = llmspeed.models.tiny("llama", seed=0)
    tiny.hf.save_pretrained(tmp_path / "hf")
    quantized = load_model(str(tmp_path / "hf"), {"format": "int8"})  # quantized while read
    assert type(quantized.hf.model.layers[0].mlp.up_proj).__name__ == "Int8Linear"
    llmspeed.save(quantized, tmp_path / "native")
    again = load_model(str(tmp_path / "native"))
    ids = [[1, 2, 3]]
    sp = SamplingParams(max_new_tokens=4, ignore_eos=True)
    assert again.generate_batched(ids, sp, progress=False)[0].token_ids == quantized.generate_batched(ids, sp, progress=False)[0].token_ids
    with pytest.raises(SystemExit, match="already quantized"):
        load_model(str(tmp_path / "native"), {"format": "int4"})


def test_serve_loads_a_gguf_file_with_its_codes(tmp_path):
    from llmspeed.serving.cli import load_model

    pytest.importorskip("gguf")
    tiny = llmspeed.models.tiny("llama", seed=0)
    llmspeed.quantize(tiny, "int4", group_size=32, symmetric=True)
    path = llmspeed.save(tiny, tmp_path / "tiny.gguf", format="gguf")
    served = load_model(str(path))
    assert torch.equal(served.hf.model.layers[0].mlp.up_proj.qweight, tiny.hf.model.layers[0].mlp.up_proj.qweight)
    ids, sp = [[1, 2, 3]], SamplingParams(max_new_tokens=4, ignore_eos=True)
    assert served.generate_batched(ids, sp, progress=False)[0].token_ids == tiny.generate_batched(ids, sp, progress=False)[0].token_ids
    with pytest.raises(SystemExit, match="is a GGUF file, quantized already; drop --quantize"):
        load_model(str(path), {"format": "int4"})
    with pytest.raises(SystemExit, match="a folder or a .gguf file; .* is none of these"):
        load_model(str(tmp_path / "missing.gguf"))


def test_closing_interleave_early_loses_no_event_a_stream_already_took():
    from llmspeed.generation import StreamEvent
    from llmspeed.serving.handle import RequestHandle, interleave

    def ev(i, tok, finished=False):
        return StreamEvent(index=0, request_id=i, token_id=tok, finished=finished)

    async def main():
        handles = [RequestHandle(lambda h: None, asyncio.get_running_loop()) for _ in range(3)]
        for i, h in enumerate(handles):
            h._deliver(ev(i, 10 * i, finished=i == 2))
        handles[1]._deliver(ev(1, 11, finished=True))
        events = interleave(handles)
        assert await anext(events) == (0, ev(0, 0))  # every stream took an event; 1's and 2's are not yet yielded
        await events.aclose()
        handles[0]._deliver(ev(0, 1, finished=True))
        got = []
        for h in handles:
            got.append([e.token_id async for e in h.events()])
        for h in handles:  # a final event given back and then handed out is handed out once, as any other
            with pytest.raises(RuntimeError, match="already iterated"):
                await anext(h.events())
        return got

    assert asyncio.run(asyncio.wait_for(main(), 20)) == [[1], [10, 11], [20]]


def test_interleave_yields_events_that_arrived_together_in_handle_order():
    """Events already waiting when interleave looks (a step's tokens of every choice) come in handle order, however
    they were delivered (mutation: the done tasks taken in set order survived the tests)."""
    from llmspeed.generation import StreamEvent
    from llmspeed.serving.handle import RequestHandle, interleave

    async def main():
        handles = [RequestHandle(lambda h: None, asyncio.get_running_loop()) for _ in range(8)]
        for i in reversed(range(8)):
            handles[i]._deliver(StreamEvent(index=0, request_id=i, token_id=i, finished=True))
        await asyncio.sleep(0)
        return [i async for i, _ in interleave(handles)]

    assert asyncio.run(asyncio.wait_for(main(), 20)) == list(range(8))
