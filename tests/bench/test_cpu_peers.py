"""The llama.cpp comparison reports, instead of failing, when its anchor is missing."""

from __future__ import annotations

import itertools
import json
import math
import sys

import pytest

from llmspeed.bench import cpu_peers, llama_anchor


def test_a_missing_anchor_is_reported_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    reason = cpu_peers.llama_cpp_missing()
    assert reason is not None and "llama-cpp-python is not installed" in reason
    assert "-DGGML_NATIVE=ON" in reason


def test_it_compares_the_embedded_model_on_the_cpu_only():
    with pytest.raises(ValueError, match="device='cuda'"):
        cpu_peers.run(device="cuda")
    with pytest.raises(ValueError, match="model='tiny-llama'"):
        cpu_peers.run(model="tiny-llama")
    with pytest.raises(ValueError, match=r"formats \['int3'\] are not cpu_peers rows; known: \['fp32'"):
        cpu_peers.run(formats=["int3"])
    # regression: [] ran nothing and returned no rows; a string was read character by character
    with pytest.raises(ValueError, match=r"formats must be a list of FORMATS keys \(or None: all\); got \[\]"):
        cpu_peers.run(formats=[])
    with pytest.raises(ValueError, match=r"formats must be a list of FORMATS keys \(or None: all\); got 'int4'.*\['int4'\]"):
        cpu_peers.run(formats="int4")


def test_every_format_maps_to_the_llama_cpp_type_of_the_same_width():
    anchors = {k: v[0] for k, v in cpu_peers.FORMATS.items() if isinstance(v, tuple)}
    assert anchors == {"fp32": "F32", "bf16": "F16", "int8": "Q8_0", "int4": "Q4_0"}
    variants = {k: v for k, v in cpu_peers.FORMATS.items() if isinstance(v, str)}
    assert variants and all(k.split(", ")[0] == v and v in anchors for k, v in variants.items())


def test_variants_build_what_their_names_say():
    """Regression guard for the llmspeed-only rows: the head and the activations are what the row claims."""
    from llmspeed.quant import Int4Linear, Int8Linear

    model = cpu_peers._llmspeed_model("int4, int8 activations, int8 lm_head")
    layers = dict(model.linear_layers())
    assert isinstance(layers["lm_head"], Int8Linear)
    assert all(isinstance(m, Int4Linear) and m.config.activations == "int8" and m.config.group_size == 64
               for n, m in layers.items() if n != "lm_head")  # fmt: skip
    options = {"int8 lm_head", "int4 lm_head", "fp32 lm_head", "int8 activations", "awq+gptq", "fp16 kv cache",
               "8 scheduler steps", "g32"}
    assert all(k.split(", ")[1:] and set(k.split(", ")[1:]) <= options
               for k, v in cpu_peers.FORMATS.items() if isinstance(v, str))  # fmt: skip
    int4_head = dict(cpu_peers._llmspeed_model("int4, int8 activations, int4 lm_head").linear_layers())["lm_head"]
    assert isinstance(int4_head, Int4Linear) and int4_head.config.group_size == 64
    assert cpu_peers._kv_cache_dtype("fp32, fp16 kv cache") == "fp16" and cpu_peers._kv_cache_dtype("int8") == "auto"
    assert cpu_peers._scheduler_steps("int8, 8 scheduler steps") == 8 and cpu_peers._scheduler_steps("int8, int8 lm_head") == 1
    plain = dict(cpu_peers._llmspeed_model("int8").linear_layers())  # quantize's default head: int8
    assert isinstance(plain["lm_head"], Int8Linear) and plain["model.layers.0.mlp.up_proj"].config.activations == "float"
    g32 = dict(cpu_peers._llmspeed_model("int4, g32").linear_layers())
    assert g32["model.layers.0.mlp.up_proj"].config.group_size == 32 and isinstance(g32["lm_head"], Int8Linear)
    float_head = dict(cpu_peers._llmspeed_model("int4, fp32 lm_head").linear_layers())
    assert type(float_head["lm_head"]).__name__ == "Linear"


def test_rounds_alternate_the_two_systems_and_report_medians_of_per_round_ratios(monkeypatch):
    """A drifting host: each round's llmspeed and llama.cpp numbers move together; the ratio holds."""
    events: list[str] = []
    slow = itertools.cycle([1.0, 3.0, 1.5])  # the host's speed in each round: slower, then in between

    def ours(model, prompt, windows, steps, kv="auto", scheduler_steps=1):
        events.append("llmspeed")
        k = next(slow)
        shared["k"] = k
        return {"decode ms": 10.0 * k, "decode ms, 8 sequences": 20.0 * k, "prefill tok/s": 600.0 / k,
                "MB": 538.0, "perplexity": 18.2}  # fmt: skip

    crashes = {"left": 1}

    def theirs(path, prompt, windows, threads, steps, extra_bufts=True):
        events.append(f"llama.cpp extra_bufts={extra_bufts}")
        if extra_bufts and crashes["left"]:
            crashes["left"] -= 1
            raise RuntimeError("llama.cpp crashed (signal 11) on F32.gguf")
        k = shared["k"]
        return {"decode ms": 11.0 * k, "decode ms, 8 sequences": 25.0 * k, "prefill tok/s": 500.0 / k,
                "MB": 540.0, "perplexity": 18.21}  # fmt: skip

    shared: dict[str, float] = {}
    interleaved = _fake_systems(monkeypatch, ours, theirs)
    (row,) = cpu_peers.run(formats=["fp32"], rounds=3, quick=True)
    # the crash is retried without extra buffer types once, and the later rounds start there
    assert events == ["llmspeed", "llama.cpp extra_bufts=True", "llama.cpp extra_bufts=False",
                      "llmspeed", "llama.cpp extra_bufts=False", "llmspeed", "llama.cpp extra_bufts=False"]  # fmt: skip
    assert row["rounds"] == 3 and "without its extra buffer types" in row["llama.cpp"]
    assert "-mno-amx-int8" in row["llama.cpp"]  # and how to build one whose repacked layouts still run
    assert row["llmspeed decode ms"] == 15.0 and row["llama.cpp decode ms"] == 16.5  # medians over rounds
    assert row["decode llmspeed / llama.cpp"] == round(10 / 11, 2)  # every round's ratio: the drift cancels
    assert row["prefill llmspeed / llama.cpp"] == 1.2
    # the 8-sequence columns are the 8-sequence numbers (median round: k = 1.5), perplexity and MB each system's own
    assert (row["llmspeed decode ms, 8 seqs"], row["llama.cpp decode ms, 8 seqs"]) == (30.0, 37.5)
    assert row["decode, 8 seqs, llmspeed / llama.cpp"] == 0.8
    assert row["ppl llmspeed / llama.cpp"] == round(18.2 / 18.21, 4) < 1
    assert (row["llmspeed ppl"], row["llama.cpp ppl"], row["llmspeed MB"], row["llama.cpp MB"]) == (18.2, 18.21, 538, 540)
    for bad in (0, True):  # True is an int to Python: it was read as one round
        with pytest.raises(ValueError, match=f"rounds must be a positive int; got {bad}"):
            cpu_peers.run(rounds=bad)
    # after the rounds, the interleaved column, without the extra buffer types that crashed
    assert interleaved.calls == [(["fp32"], "F32", 4, False)]
    assert row["decode, interleaved, llmspeed / llama.cpp"] == 0.91 and row["blocks"] == 4
    assert row["llmspeed decode ms, interleaved"] == 9.0 and row["llama.cpp decode ms, interleaved"] == 10.0
    interleaved.fails, crashes["left"] = True, 0
    (row,) = cpu_peers.run(formats=["fp32"], quick=True, interleave=2)
    assert row["interleaved"].startswith("llama.cpp crashed (signal 11)") and "blocks" not in row
    assert interleaved.calls[-1] == (["fp32"], "F32", 2, True)
    (row,) = cpu_peers.run(formats=["fp32"], quick=True, interleave=0)
    assert len(interleaved.calls) == 2 and "interleaved" not in row  # 0 blocks: no column, no child
    for bad in (-1, 33, 2.5, True):  # True: read as 1 block; 33 blocks: llama.cpp's side would step 1 + 34 x 8 of the 272 tokens after the prefix
        with pytest.raises(ValueError, match=f"interleave must be an int of 0 to 32 blocks; got {bad}"):
            cpu_peers.run(interleave=bad)


def test_variants_are_paired_with_the_anchor_of_their_own_round(monkeypatch):
    """A variant's ratios come from the llama.cpp numbers of the round it was timed in, not from the anchor's
    medians: the host's drift cancels for it as for the base format."""
    events: list[str] = []
    speeds = iter([1.0, 3.0, 1.5, 1.0])  # round 1 quick, round 2 slow, round 3 in between; read per llama.cpp run
    factors = iter([0.5, 0.5, 0.9])  # the variant against the base format, per round (its own noise)

    def ours(model, prompt, windows, steps, kv="auto", scheduler_steps=1):
        events.append(f"llmspeed {kv}")
        k = shared["k"]
        factor = next(factors) if kv == "fp16" else 1.0
        return {"decode ms": 10.0 * k * factor, "decode ms, 8 sequences": 20.0 * k * factor,
                "prefill tok/s": 600.0 / k, "MB": 538.0, "perplexity": 18.2}  # fmt: skip

    def theirs(path, prompt, windows, threads, steps, extra_bufts=True):
        events.append("llama.cpp")
        k = shared["k"]
        shared["k"] = next(speeds)  # the host changes speed after each round
        return {"decode ms": 11.0 * k, "decode ms, 8 sequences": 25.0 * k, "prefill tok/s": 500.0 / k,
                "MB": 540.0, "perplexity": 18.21}  # fmt: skip

    shared = {"k": next(speeds)}
    _fake_systems(monkeypatch, ours, theirs)
    base, variant = cpu_peers.run(formats=["fp32, fp16 kv cache"], rounds=3, quick=True)
    assert events == ["llmspeed auto", "llmspeed fp16", "llama.cpp"] * 3
    assert base["format"] == "fp32 / F32" and variant["format"] == "fp32, fp16 kv cache (llmspeed only)"
    assert variant["against"] == "fp32 / F32" and variant["rounds"] == 3
    # per-round ratios 5/11, 5/11, 9/11: their median; the medians' ratio would be 13.5 / 16.5
    assert variant["decode llmspeed / llama.cpp"] == round(5 / 11, 2)
    assert base["decode llmspeed / llama.cpp"] == round(10 / 11, 2)
    assert "llama.cpp decode ms" not in variant  # the anchor's own numbers are on the base row only


def test_interleaved_blocks_pair_each_block_with_the_anchor_blocks_around_it():
    """A host whose speed changes between blocks: each llmspeed block meets llama.cpp's speed of its moment."""
    theirs = [10.0, 30.0, 15.0, 20.0]  # llama.cpp's blocks; the host slows down, speeds up, slows a little
    ours = [0.9 * (a + b) / 2 for a, b in zip(theirs, theirs[1:])]  # 0.9x llama.cpp at each moment
    got = cpu_peers.paired_blocks(ours, theirs)
    assert got["ratio"] == pytest.approx(0.9)
    assert got["llmspeed ms"] / got["llama.cpp ms"] != pytest.approx(0.9)  # the medians' ratio is off: 18.9 / 17.5
    with pytest.raises(ValueError, match="theirs must have one block more than ours; got 3 and 3"):
        cpu_peers.paired_blocks(ours, theirs[:3])


def test_interleaved_column_alternates_the_blocks_and_closes_both_sides(monkeypatch):
    events: list[str] = []
    speed = {"k": 1.0}

    class Llama:
        def __init__(self, path, prompt, threads, extra_bufts):
            events.append(f"llama.cpp start extra_bufts={extra_bufts}")

        def block(self, n):
            events.append("llama.cpp")
            speed["k"] *= 2  # the host halves its speed after every llama.cpp block
            return [10.0 * speed["k"] / 2] * n

        def close(self):
            events.append("llama.cpp closed")

    def steps(model, prompt, kv="auto"):
        try:
            while True:
                yield 8.0 * speed["k"] * (0.5 if kv == "fp16" else 1.0)
        finally:
            events.append(f"llmspeed {kv} closed")

    def counted(model, prompt, kv="auto", scheduler_steps=1):
        events.append(f"llmspeed {kv}")
        return steps(model, prompt, kv)

    monkeypatch.setattr(cpu_peers, "LlamaBlocks", Llama)
    monkeypatch.setattr(cpu_peers, "_llmspeed_steps", counted)
    monkeypatch.setattr(cpu_peers, "requantized", lambda name, ftype, threads: __import__("pathlib").Path("/x"))
    monkeypatch.setattr(cpu_peers, "SETTLE_S", 0.0)
    got = cpu_peers._interleaved({"fp32": None, "fp32, fp16 kv cache": None}, ("F32", 0), list(range(400)), 2,
                                 blocks=2, extra_bufts=False)  # fmt: skip
    assert [e for e in events if e.startswith("llama.cpp")] == ["llama.cpp start extra_bufts=False", "llama.cpp",
                                                                "llama.cpp", "llama.cpp", "llama.cpp closed"]  # fmt: skip
    assert {e for e in events if e.endswith("closed")} >= {"llmspeed auto closed", "llmspeed fp16 closed"}
    # llama.cpp's blocks take 10, 20, 40 ms; llmspeed's between them 16 and 32 (8 and 16 with fp16): 16 / 15 each
    assert got["fp32"]["ratio"] == pytest.approx(16 / 15) and got["fp32, fp16 kv cache"]["ratio"] == pytest.approx(8 / 15)




def test_llmspeed_rows_time_one_and_eight_sequences(monkeypatch):
    """The "8 sequences" decode column runs SEQS prompts (of the prefix length), the other one."""
    import importlib

    perplexity = importlib.import_module("llmspeed.eval.perplexity")  # the package exports a function of this name

    calls = []

    def steps(model, prompts, steps, **options):
        calls.append((len(prompts), {len(p) for p in prompts}, options))
        return 5.0 * len(prompts), "fused cpu"

    monkeypatch.setattr(cpu_peers, "decode_step_ms", steps)
    monkeypatch.setattr(cpu_peers, "prefill_rate", lambda ready: 700.0)
    monkeypatch.setattr(cpu_peers, "memory_footprint", lambda model: {"total": 538e6})
    monkeypatch.setattr(perplexity, "window_losses", lambda model, text, window, n_windows: __import__("torch").ones(4))
    model = type("Model", (), {"tokenizer": type("Tok", (), {"decode": lambda self, ids: "text"})()})()
    got = cpu_peers._llmspeed_rows(model, list(range(400)), __import__("torch").zeros(2, 8), 16, "fp16", 8)
    prefix = cpu_peers.PREFIX
    assert calls == [(1, {prefix}, {"kv_cache_dtype": "fp16", "scheduler_steps": 8}),
                     (cpu_peers.SEQS, {prefix}, {"kv_cache_dtype": "fp16", "scheduler_steps": 8})]
    assert got["decode ms"] == 5.0 and got["decode ms, 8 sequences"] == 5.0 * cpu_peers.SEQS
    assert got["perplexity"] == pytest.approx(math.e) and got["MB"] == 538.0 and got["prefill tok/s"] == 700.0


def _fake_systems(monkeypatch, ours, theirs):
    """run() with ``ours`` and ``theirs`` as the two systems' measurements, no model, GGUF or llama.cpp."""
    monkeypatch.setattr(cpu_peers, "llama_cpp_missing", lambda: None)
    monkeypatch.setattr(cpu_peers, "requantized", lambda name, ftype, threads: __import__("pathlib").Path(f"/x/{name}.gguf"))
    monkeypatch.setattr(cpu_peers, "_llmspeed_model", lambda fmt, progress=False: _FakeModel())
    monkeypatch.setattr(cpu_peers, "pydoc_ids", lambda model, n: list(range(n)))
    monkeypatch.setattr(cpu_peers, "_llmspeed_rows", ours)
    monkeypatch.setattr(cpu_peers, "llama_rows_isolated", theirs)

    def interleaved(models, anchor, prompt, threads, blocks, extra_bufts):
        interleaved.calls.append((sorted(models), anchor[0], blocks, extra_bufts))
        if interleaved.fails:
            raise RuntimeError("llama.cpp crashed (signal 11) in the interleaved decode steps")
        return {fmt: {"llmspeed ms": 9.0, "llama.cpp ms": 10.0, "ratio": 0.91} for fmt in models}

    interleaved.calls, interleaved.fails = [], False
    monkeypatch.setattr(cpu_peers, "_interleaved", interleaved)
    return interleaved


class _FakeModel:
    """What run() reads of a model besides the faked measurements."""

    def linear_layers(self):
        return []




def _fake_llama_cpp(decoded: list[list[tuple[int, int, int]]]):
    """A ``llama_cpp`` module whose batch API records each decode's ``(token, position, sequence)`` entries."""
    from types import SimpleNamespace

    def batch_init(n_tokens, embd, n_seq_max):
        return SimpleNamespace(n_tokens=0, token=[0] * n_tokens, pos=[0] * n_tokens, n_seq_id=[0] * n_tokens,
                               logits=[False] * n_tokens, seq_id=[[0] for _ in range(n_tokens)])  # fmt: skip

    def decode(ctx, batch):
        decoded.append([(batch.token[i], batch.pos[i], batch.seq_id[i][0]) for i in range(batch.n_tokens)])
        return 0

    return SimpleNamespace(
        llama_model_load_from_file=lambda path, params: "model", llama_model_default_params=lambda: None,
        llama_context_default_params=lambda: SimpleNamespace(), llama_init_from_model=lambda model, params: "ctx",
        llama_batch_init=batch_init, llama_decode=decode, llama_synchronize=lambda ctx: None,
        llama_batch_free=lambda batch: None, llama_free=lambda ctx: None, llama_model_free=lambda model: None,
    )  # fmt: skip


def test_the_most_interleaved_blocks_run_accepts_stay_within_the_prompt(monkeypatch, capsys):
    """Regression: run() accepted interleave=33, but llama.cpp's side then needs 1 + 34 x 8 = 273 steps of the
    272 prompt tokens after the prefix: its child died in the last block and the column read "llama.cpp crashed"."""
    import io
    import re

    with pytest.raises(ValueError, match="interleave must be an int of 0 to") as err:
        cpu_peers.run(interleave=10_000)
    most = int(re.search(r"0 to (\d+) blocks", str(err.value)).group(1))
    decoded: list[list[tuple[int, int, int]]] = []
    monkeypatch.setitem(sys.modules, "llama_cpp", _fake_llama_cpp(decoded))
    prompt = list(range(1000, 1000 + cpu_peers.PROMPT_TOKENS))
    job = json.dumps({"path": "/x/F32.gguf", "prompt": prompt, "threads": 2, "extra_bufts": True})
    # what _interleaved asks of the child: a block before the first of ours and one after each
    requests = f"{cpu_peers.BLOCK_STEPS}\n" * (most + 1)
    monkeypatch.setattr(sys, "stdin", io.StringIO(job + "\n" + requests))
    llama_anchor.serve_llama_steps()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[]" and [len(json.loads(line)) for line in lines[1:]] == [cpu_peers.BLOCK_STEPS] * (most + 1)
    steps = decoded[1:]  # after the prefill, one token a step, the prompt's own tokens in their positions
    assert decoded[0] == [(t, p, 0) for p, t in enumerate(prompt[: llama_anchor.PREFIX])]
    assert steps == [[(prompt[p], p, 0)] for p in range(llama_anchor.PREFIX, llama_anchor.PREFIX + len(steps))]


def test_progress_false_shows_no_bar_and_true_shows_the_suites_and_the_calibrations(monkeypatch, shown_bars):
    """Regression: run() took ``progress`` and ignored it: the awq+gptq rows calibrated with quantize's default,
    a bar over decoder layers, under --no-progress too, and progress=True showed no bar of the suite's own."""
    import llmspeed
    from llmspeed.models.embedded import tokenizer

    tok = tokenizer()  # a tiny model under the embedded tokenizer (the default calibration text needs one)
    tiny = lambda: llmspeed.Model(llmspeed.models.tiny("llama", vocab_size=len(tok)).hf, tok)  # noqa: E731
    real_quantize, real_model = cpu_peers.quantize, cpu_peers._llmspeed_model

    def small(model, fmt, **kwargs):  # the real calibration chain, on 2 windows of 16 tokens
        kwargs.get("method_options", {}).update(n_sequences=2, seq_len=16)
        return real_quantize(model, fmt, **kwargs)

    _fake_systems(monkeypatch, lambda *a: {"decode ms": 1.0, "decode ms, 8 sequences": 2.0, "prefill tok/s": 3.0,
                                           "MB": 4.0, "perplexity": 5.0},
                  lambda *a, **k: None)  # fmt: skip
    monkeypatch.setattr(cpu_peers, "_llmspeed_model", real_model)
    monkeypatch.setattr(cpu_peers, "smollm2", tiny)
    monkeypatch.setattr(cpu_peers, "quantize", small)
    variant = "int4, awq+gptq, int8 activations, int8 lm_head"
    assert len(cpu_peers.run(formats=[variant], quick=True, interleave=0, progress=False)) == 2
    assert shown_bars == []
    cpu_peers.run(formats=[variant], quick=True, interleave=0, progress=True)
    assert shown_bars == ["cpu_peers", "awq"]  # the suite's, then the calibration's over decoder layers
