"""``python -m llmspeed serve`` flags refused before any model is loaded (fast; the slow ones are in test_server.py)."""

from __future__ import annotations

import sys

import pytest
import torch

from llmspeed.serving import cli


def test_group_size_without_quantize_is_refused_not_ignored(monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded: --group-size without --quantize would serve the float model")

    monkeypatch.setattr(cli, "load_model", no_load)
    with pytest.raises(SystemExit, match="--group-size 64 needs --quantize"):
        cli.build(cli.build_parser().parse_args(["--group-size", "64"]))


@pytest.mark.parametrize("flags, named", [
    (["--port", "-1"], "--port"), (["--port", "70000"], "--port"), (["--kv-cache-tokens", "0"], "--kv-cache-tokens"),
    (["--kv-cache-tokens", "-5"], "--kv-cache-tokens"), (["--max-batch-tokens", "0"], "--max-batch-tokens"),
    (["--max-seqs", "-1"], "--max-seqs"), (["--num-scheduler-steps", "0"], "--num-scheduler-steps"),
    (["--quantize", "int4", "--group-size", "0"], "--group-size"), (["--quantize", "int4", "--group-size", "7"], "--group-size"),
    (["--log-level", "loud"], "--log-level"), (["--adapter", "nopath"], "--adapter"), (["--adapter", "x=/nonexistent"], "--adapter"),
])  # fmt: skip
def test_bad_numbers_levels_and_adapters_are_refused_at_parse_time(flags, named, capsys):
    # Regression: these were parsed as plain ints/strings, so the server loaded (and quantized) the model first, then
    # died with a traceback from the engine, quantize, lora or uvicorn (a bad --port or --log-level only at bind).
    with pytest.raises(SystemExit) as err:
        cli.build_parser().parse_args(flags)
    assert err.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {named}" in message and repr(flags[-1]) in message, message


def test_good_numbers_levels_and_adapters_parse(tmp_path):
    args = cli.build_parser().parse_args(["--port", "0", "--kv-cache-tokens", "16", "--max-seqs", "1", "--quantize", "int4",
                                          "--group-size", "32", "--log-level", "debug", "--adapter", f"a={tmp_path}"])  # fmt: skip
    assert (args.port, args.kv_cache_tokens, args.max_seqs, args.group_size, args.log_level) == (0, 16, 1, 32, "debug")
    assert args.adapter == [f"a={tmp_path}"]
    assert cli.build_parser().parse_args(["--port", "65535"]).port == 65535  # the bounds are inclusive


@pytest.mark.parametrize("flags, says", [
    (["--model", "/nonexistent"], "--model must be 'smollm2', a folder or a .gguf file"), (["--model", "EMPTY"], "is not a checkpoint folder"),
    (["--group-size", "64"], "--group-size 64 needs --quantize"), (["--activations", "int8"], "--activations int8 needs --quantize"),
    # regression: int8 with a group size loaded (and began quantizing) the model, then died with quantize's traceback
    (["--quantize", "int8", "--group-size", "64"], "--group-size 64 is for --quantize int4 or nf4"),
])  # fmt: skip
def test_main_refuses_bad_flags_with_argparse_exit_status(flags, says, tmp_path, capsys):
    # Regression: build()'s refusals left main() as SystemExit(message), exit status 1 unlike argparse's 2, and an
    # empty --model folder gave a ValueError traceback from the format detection.
    flags = [str(tmp_path) if f == "EMPTY" else f for f in flags]
    with pytest.raises(SystemExit) as err:
        cli.main(flags)
    assert err.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("python -m llmspeed serve: error: ") and says in message, message


@pytest.mark.parametrize("missing", ["uvicorn", "fastapi"])
def test_help_works_and_a_missing_serve_extra_is_named_before_loading(missing, monkeypatch, capsys):
    # Regression: main() imported uvicorn before parsing, so without the serve extra even --help was a
    # ModuleNotFoundError traceback, and a missing fastapi showed only after the model had loaded.
    monkeypatch.setitem(sys.modules, missing, None)  # import raises ImportError, as when not installed

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the missing package was named")

    monkeypatch.setattr(cli, "load_model", no_load)
    with pytest.raises(SystemExit) as err:
        cli.main(["--help"])
    assert err.value.code == 0 and "--kv-cache-tokens" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=rf"\({missing} is missing\): pip install \"llmspeed\[serve\]\""):
        cli.main([])


@pytest.mark.parametrize("given", [".", "./", ".."])
def test_the_served_name_of_a_relative_folder_is_the_folders_name(given, llama, tmp_path, monkeypatch):
    # Regression: the served name was Path(--model).name, "" for "." and "./" (".." for ".."): /v1/models listed a model
    # with the id "", and requests had to send "model": "".
    folder = tmp_path / "my-model"
    (folder / "sub").mkdir(parents=True)
    monkeypatch.chdir(folder / "sub" if given.startswith("..") else folder)
    monkeypatch.setattr(cli, "load_model", lambda *args, **kwargs: llama)
    engine, server = cli.build(cli.build_parser().parse_args(["--model", given, "--kv-cache-tokens", "64"]))
    try:
        assert server.model_name == "my-model" and [m["id"] for m in server.models()["data"]] == ["my-model"]
    finally:
        engine.close()


def test_flags_reach_the_quantize_recipe_the_engine_and_the_server(llama, monkeypatch):
    """--no-quantize-lm-head, --activations, --served-model-name, --no-prefix-caching and --scheduling-policy each change
    what is built (mutations dropping any of them survived)."""
    recipes = []
    monkeypatch.setattr(cli, "load_model", lambda name, recipe=None, dtype="auto": recipes.append((recipe, dtype)) or llama)
    flags = ["--quantize", "int8", "--no-quantize-lm-head", "--activations", "int8", "--served-model-name", "mine",
             "--no-prefix-caching", "--kv-cache-tokens", "64", "--scheduling-policy", "priority", "--dtype", "bfloat16"]  # fmt: skip
    engine, server = cli.build(cli.build_parser().parse_args(flags))
    try:
        assert recipes == [({"format": "int8", "lm_head": None, "activations": "int8"}, "bfloat16")]
        assert server.model_name == "mine" and not engine.generator.blocks.prefix_caching
        assert engine.generator.scheduler.policy == "priority"
    finally:
        engine.close()


OPTIONAL = {"--allow-runtime-lora-updating": ("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "/v1/load_lora_adapter"),
            "--enable-responses-store": ("VLLM_ENABLE_RESPONSES_API_STORE", "/v1/responses/{rid}")}


@pytest.mark.parametrize("flag", list(OPTIONAL))
@pytest.mark.parametrize("given, env, on", [(False, None, False), (True, None, True), (False, "True", True),
                                            (False, "1", True), (False, "0", False)])  # fmt: skip
def test_optional_endpoints_are_off_unless_their_flag_or_vllms_variable_asks(flag, given, env, on, llama, monkeypatch):
    variable, route = OPTIONAL[flag]
    for name, _ in OPTIONAL.values():
        monkeypatch.delenv(name, raising=False)
    if env is not None:
        monkeypatch.setenv(variable, env)
    monkeypatch.setattr(cli, "load_model", lambda name, recipe=None, dtype="auto": llama)
    engine, server = cli.build(cli.build_parser().parse_args([*([flag] if given else []), "--kv-cache-tokens", "64"]))
    engine.close()
    assert (route in {getattr(r, "path", None) for r in server.app().routes}) is on
    assert (server.allow_runtime_lora if flag == "--allow-runtime-lora-updating" else server.responses_store is not None) is on


def test_chat_template_replaces_the_tokenizers_from_a_file_or_inline(smollm2, monkeypatch, tmp_path, capsys):
    """vLLM's --chat-template: a file or the template itself; a mistyped path is refused, not taken as a template."""
    monkeypatch.setattr(cli, "load_model", lambda *args, **kwargs: smollm2)
    shout = "{% for m in messages %}{{ m['content'] | upper }}\n{% endfor %}"
    (tmp_path / "t.jinja").write_text(shout)
    for given in (str(tmp_path / "t.jinja"), shout):
        engine, server = cli.build(cli.build_parser().parse_args(["--kv-cache-tokens", "64", "--chat-template", given]))
        engine.close()
        assert server.tokenizer.chat_template == shout
        ids = server.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        assert ids == "HI\n"
    with pytest.raises(SystemExit) as err:
        cli.main(["--kv-cache-tokens", "64", "--chat-template", str(tmp_path / "missing.jinja")])
    assert err.value.code == 2 and "--chat-template must be a file or a Jinja template" in capsys.readouterr().err


def test_vllms_flag_names_parse_as_ours(tmp_path):
    """A vLLM launch line's flags for the same knobs: --max-num-seqs, --max-num-batched-tokens, --lora-modules (several
    NAME=PATH after one flag), --no-enable-prefix-caching / --enable-prefix-caching."""
    a, b = f"a={tmp_path}", f"b={tmp_path}"
    vllm = cli.build_parser().parse_args(["--max-num-seqs", "3", "--max-num-batched-tokens", "100", "--lora-modules",
                                          a, b, "--no-enable-prefix-caching"])  # fmt: skip
    ours = cli.build_parser().parse_args(["--max-seqs", "3", "--max-batch-tokens", "100", "--adapter", a,
                                          "--adapter", b, "--no-prefix-caching"])  # fmt: skip
    assert vars(vllm) == vars(ours) and ours.adapter == [a, b] and ours.no_prefix_caching
    assert not cli.build_parser().parse_args(["--no-prefix-caching", "--enable-prefix-caching"]).no_prefix_caching


def test_dtype_casts_a_float_checkpoint_before_quantizing_and_is_refused_for_a_quantized_one(tmp_path):
    import llmspeed

    model = cli.load_model("smollm2", {"format": "int8"}, "bfloat16")
    assert model.spec.dtype == torch.bfloat16 and type(model.hf.model.layers[0].mlp.up_proj).__name__ == "Int8Linear"
    path = llmspeed.save(llmspeed.quantize(llmspeed.models.tiny("llama"), "int4", group_size=32), tmp_path / "m.gguf",
                         format="gguf")  # fmt: skip
    with pytest.raises(SystemExit, match=r"m.gguf is a GGUF file: --dtype float16 applies to float checkpoints"):
        cli.load_model(str(path), None, "float16")


def test_seed_makes_unseeded_requests_repeat_across_server_starts(llama, monkeypatch):
    """vLLM's --seed: requests without a seed of their own draw it from a generator the flag seeds."""
    from llmspeed import SamplingParams

    monkeypatch.setattr(cli, "load_model", lambda *args, **kwargs: llama)
    sp = SamplingParams(max_new_tokens=8, temperature=1.0, ignore_eos=True)

    def answers(*flags):
        engine, _ = cli.build(cli.build_parser().parse_args(["--kv-cache-tokens", "64", *flags]))
        try:
            return [engine.submit([1, 2, 3], sp).result(timeout=60).token_ids for _ in range(3)]
        finally:
            engine.close()

    first = answers("--seed", "7")
    assert answers("--seed", "7") == first and answers("--seed", "8") != first
    assert len({tuple(t) for t in first}) > 1  # each request still draws its own seed


def test_auto_tool_choice_flag_and_vllms_api_key_variable(llama, monkeypatch):
    """--enable-auto-tool-choice (vLLM's) refuses to start without a tool-call format and takes --tool-call-parser;
    VLLM_API_KEY sets --api-key's default as in vLLM."""
    monkeypatch.setattr(cli, "load_model", lambda *args, **kwargs: llama)
    with pytest.raises(SystemExit, match="--enable-auto-tool-choice: this model has no tool-call format"):
        cli.build(cli.build_parser().parse_args(["--kv-cache-tokens", "64", "--enable-auto-tool-choice"]))
    flags = ["--kv-cache-tokens", "64", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    engine, server = cli.build(cli.build_parser().parse_args(flags))
    engine.close()
    assert server.response_template is not None
    monkeypatch.setenv("VLLM_API_KEY", "k")
    assert cli.build_parser().parse_args([]).api_key == "k"
    assert cli.build_parser().parse_args(["--api-key", "mine"]).api_key == "mine"
    monkeypatch.delenv("VLLM_API_KEY")
    assert cli.build_parser().parse_args([]).api_key is None


def test_activations_alone_apply_to_a_quantized_checkpoint_and_are_refused_for_a_float_one(tmp_path, monkeypatch):
    """``serve --model m.gguf --activations int8``: the file's layers multiply int8 activations (as llama.cpp computes
    it); a float checkpoint without ``--quantize`` is refused before it loads."""
    pytest.importorskip("gguf")
    import llmspeed

    model = llmspeed.quantize(llmspeed.models.tiny("llama", seed=0), "int4", group_size=32, symmetric=True, lm_head="int8")
    path = llmspeed.save(model, tmp_path / "m.gguf", format="gguf")
    served = cli.load_model(str(path), {"activations": "int8"})
    assert {m.config.activations for _, m in served.linear_layers()} == {"int8"}
    assert {m.config.activations for _, m in cli.load_model(str(path)).linear_layers()} == {"float"}
    llmspeed.models.tiny("llama", seed=0).hf.save_pretrained(tmp_path / "float")
    monkeypatch.setattr(llmspeed.models, "from_pretrained", lambda *a, **k: pytest.fail("the float model was loaded"))
    with pytest.raises(SystemExit, match="--activations int8 needs --quantize FORMAT for a float model"):
        cli.load_model(str(tmp_path / "float"), {"activations": "int8"})
