"""``python -m llmspeed serve``: load a model (quantize it, add adapters) and serve it over HTTP."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

KV_BLOCK_TOKENS = 16  # the engine's default block_size: the smallest KV cache it takes
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's names


def build_parser() -> argparse.ArgumentParser:
    """The ``serve`` argument parser."""
    p = argparse.ArgumentParser(prog="python -m llmspeed serve", description="An OpenAI-compatible server over llmspeed's engine.")
    p.add_argument("--model", default="smollm2", help="smollm2 (the embedded model), a folder (llmspeed.save's or a transformers checkpoint) or a .gguf file")
    p.add_argument("--served-model-name", default=None, help="the name clients send as `model` (default: --model's name)")
    p.add_argument("--quantize", default=None, choices=["int8", "int4", "nf4"], help="quantize the weights after loading")
    p.add_argument("--group-size", type=_even_group, default=None, help="group size for int4 / nf4 (a positive even integer)")
    p.add_argument("--quantize-lm-head", action=argparse.BooleanOptionalAction, default=None,
                   help="with --quantize (on unless --no-quantize-lm-head, as in llmspeed.quantize): the output head at int8 per channel in "
                        "every format, as llama.cpp's Q8_0 and Q4_0 files; a tied input embedding reads its rows. "
                        "--no-quantize-lm-head keeps it float (llmspeed.quantize(..., lm_head=None); docs/serving.md: the cost)")
    p.add_argument("--activations", default="float", choices=["float", "int8"],
                   help="int8 activations (docs/quantization.md: integer dot products on AVX-512 VNNI or AVX2, their cost): with "
                        "--quantize, or alone for a quantized checkpoint (a GGUF file: as llama.cpp computes it)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="the weights' dtype for a float checkpoint or smollm2, before --quantize (vLLM's flag; auto: "
                        "float32, the CPU's fast path here; 16-bit as llmspeed.cast makes it)")
    p.add_argument("--adapter", "--lora-modules", action="extend", nargs="+", default=[], type=_adapter,
                   metavar="NAME=PATH", help="LoRA adapter folders (ours or PEFT's); repeat or list several "
                                             "(--lora-modules is vLLM's name for it)")
    p.add_argument("--lora-dtype", default="float16", choices=["float16", "float32"],
                   help="precision of the adapters the fused CPU decode step reads (docs/lora.md)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_int_in(0, 65535), default=8000, help="TCP port, 0 to 65535 (default 8000)")
    p.add_argument("--allow-runtime-lora-updating", action="store_true",
                   default=_env_flag("VLLM_ALLOW_RUNTIME_LORA_UPDATING"),
                   help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's; its environment "
                        "variable VLLM_ALLOW_RUNTIME_LORA_UPDATING=true turns this on too)")
    p.add_argument("--enable-responses-store", action="store_true",
                   default=_env_flag("VLLM_ENABLE_RESPONSES_API_STORE"),
                   help="keep Responses API answers in memory (the last 1024) for previous_response_id and GET / "
                        "DELETE /v1/responses/{id} (vLLM's VLLM_ENABLE_RESPONSES_API_STORE=1 turns this on too)")
    p.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on every API request (/v1/...; /health and /metrics stay "
                        "open); vLLM's VLLM_API_KEY environment variable sets it too")
    p.add_argument("--kv-cache-tokens", type=_int_in(KV_BLOCK_TOKENS), default=16384,
                   help=f"KV cache budget in tokens (at least one block: {KV_BLOCK_TOKENS})")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the cached keys and values (auto: the model's; docs/batching.md)")
    p.add_argument("--max-batch-tokens", "--max-num-batched-tokens", type=_int_in(1), default=512,
                   help="most tokens in one forward pass (--max-num-batched-tokens: vLLM's name)")
    p.add_argument("--max-seqs", "--max-num-seqs", type=_int_in(1), default=64,
                   help="most requests running at once (--max-num-seqs: vLLM's name)")
    p.add_argument("--max-model-len", type=_int_in(2), default=None,
                   help="most tokens (prompt and answer) one request may hold, below the model's context (vLLM's)")
    p.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"],
                   help="fcfs: first come, first served; priority: requests' `priority` field (lower first) orders "
                        "admission and picks whom to preempt (vLLM's)")
    p.add_argument("--no-prefix-caching", "--no-enable-prefix-caching", action="store_true",
                   help="do not share KV blocks of common prompt prefixes (--no-enable-prefix-caching: vLLM's name)")
    p.add_argument("--enable-prefix-caching", action="store_false", dest="no_prefix_caching",
                   help="share KV blocks of common prompt prefixes (the default; vLLM's flag)")
    p.add_argument("--num-scheduler-steps", type=_int_in(1), default=1,
                   help="decode steps one engine step may run back to back when no running request wants logprobs or "
                        "penalties and none waits (greedy only on the fused CPU step; less Python between steps, and on "
                        "a GPU no wait for each step's tokens; tokens stream in bursts; docs/batching.md)")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="require tool_choice 'auto' to be served: refuse to start when no tool-call parser is given or "
                        "known for the model (vLLM's flag; without it, 'auto' is served when one is known)")
    p.add_argument("--tool-call-parser", type=_tool_call_parser, default=None, metavar="{hermes,FILE.json}",
                   help="how tool_choice 'auto' (the default when a request has tools) reads tool calls out of an "
                        "answer: hermes (<tool_call>{...}</tool_call>: Hermes, Qwen 2/2.5/3), or a JSON file holding a "
                        "transformers response template (default: the tokenizer's response_template if it has one, else hermes for "
                        "Qwen 2 and 3 models)")
    p.add_argument("--chat-template", default=None, metavar="FILE_OR_TEMPLATE",
                   help="the Jinja chat template to render chat requests with, in place of the tokenizer's: a file, or "
                        "the template itself (vLLM's flag)")
    p.add_argument("--generation-config", default="auto", metavar="{auto,vllm,FOLDER}",
                   help="where a request's sampling defaults come from when it leaves temperature, top_p, top_k, min_p "
                        "or repetition_penalty out (vLLM's flag): auto, the model's generation config (as vLLM); "
                        "vllm, the OpenAI API's defaults; or a folder holding a generation_config.json")
    p.add_argument("--seed", type=int, default=None,
                   help="seed the random draws of requests that give no seed of their own, so a server started again "
                        "answers the same requests, in the same order, alike (vLLM's flag)")
    p.add_argument("--log-level", "--uvicorn-log-level", default="warning", choices=LOG_LEVELS,
                   help="uvicorn's log level (--uvicorn-log-level: vLLM's name)")
    return p


def _int_in(least: int, most: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer from ``least`` to ``most``, refused at parse time (before a model loads)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < least or (most is not None and value > most):
            bound = f">= {least}" if most is None else f"from {least} to {most}"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}; got {text!r}")
        return value

    return parse


def _tool_call_parser(text: str) -> str | dict[str, Any]:
    from .tool_parser import TEMPLATES, response_template

    if text in TEMPLATES:
        return text
    try:
        with open(text, encoding="utf-8") as f:
            template = json.load(f)
    except (OSError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"expected {' or '.join(sorted(TEMPLATES))}, or a JSON file holding a response "
                                         f"template; {text!r}: {err}") from None  # fmt: skip
    try:
        response_template(None, template)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text}: {err}") from None
    return template


def _even_group(text: str) -> int:
    """An argparse ``type`` for ``--group-size``: a positive even integer (two 4-bit codes share a byte)."""
    value = _int_in(2)(text)
    if value % 2:
        raise argparse.ArgumentTypeError(f"must be a positive even integer (two 4-bit codes share a byte); got {text!r}")
    return value


def _env_flag(name: str) -> bool:
    """Whether environment variable ``name`` (one of vLLM's switches) is set to ``1`` or ``true``."""
    return os.environ.get(name, "").lower() in ("1", "true")


def _adapter(spec: str) -> str:
    """An argparse ``type`` for ``--adapter``: ``NAME=PATH`` with ``PATH`` an existing folder."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"takes NAME=PATH; got {spec!r}")
    if not Path(path).is_dir():
        raise argparse.ArgumentTypeError(f"PATH must be an adapter folder; got {spec!r}, but {path!r} is not a folder")
    return spec


def load_model(name: str, quantize: dict[str, Any] | None = None, dtype: str = "auto") -> Any:
    """``smollm2``, a folder (llmspeed's, compressed-tensors, GPTQ, AWQ, or a float transformers checkpoint), or a
    GGUF file (llama.cpp's, with its own codes: :mod:`llmspeed.quant.formats.gguf_load`).

    A float checkpoint with ``quantize`` is quantized while it is read (one tensor at a time); a model that
    is already quantized is returned as it is, and ``quantize`` then is an error, unless it holds ``activations``
    alone (``--activations int8`` without ``--quantize``): the quantized checkpoint's layers then take those
    (``llmspeed.load(..., activations=)``), and a float model refuses it. ``dtype`` (``--dtype``): a float
    checkpoint's weights, before ``quantize`` (``"auto"``: float32); a quantized one keeps its own.
    """
    from .. import models, precision, quant
    from ..quant.formats.files import detect

    activations = None
    if quantize is not None and "format" not in quantize:
        activations, quantize = quantize["activations"], None

    def floats() -> None:
        if activations is not None:
            raise SystemExit(f"--activations {activations} needs --quantize FORMAT for a float model ({name}); a "
                             f"quantized checkpoint (a GGUF file, a quantized folder) takes it alone")

    def already(what: str) -> None:
        if dtype != "auto":
            raise SystemExit(f"{name} is {what}: --dtype {dtype} applies to float checkpoints (llmspeed.cast before "
                             f"quantizing); drop it")  # fmt: skip

    if name == "smollm2":
        floats()
        model = models.smollm2()
        if dtype != "auto":
            precision.cast(model, dtype)
        if quantize:
            rest = {k: v for k, v in quantize.items() if k != "format"}
            quant.quantize(model, quantize["format"], **rest)
        return model
    path = Path(name)
    if path.is_file() and path.suffix.lower() == ".gguf":
        if quantize:
            raise SystemExit(f"{name} is a GGUF file, quantized already; drop --quantize")
        already("a GGUF file")
        return quant.load(path, activations=activations)
    if not path.is_dir():
        raise SystemExit(f"--model must be 'smollm2', a folder or a .gguf file; {name!r} is none of these")
    try:
        kind = detect(path)
    except ValueError as err:  # a folder without model.safetensors (or its index): no checkpoint to serve
        raise SystemExit(f"--model {name!r} is not a checkpoint folder: {err}") from err
    if kind == "float":
        floats()
        return models.from_pretrained(path, dtype="float32" if dtype == "auto" else dtype, quantize=quantize)
    if quantize:
        raise SystemExit(f"{name} is already quantized; drop --quantize")
    already("quantized already")
    return quant.load(path, activations=activations)


def chat_template(given: str) -> str:
    """``--chat-template``'s template: a file's text, or the value itself when it holds Jinja (``{{`` or ``{%``), as
    vLLM reads the flag; anything else is refused (a mistyped path would otherwise become a template)."""
    path = Path(given)
    try:
        if path.is_file():
            return path.read_text()
    except OSError:  # a long template is no path
        pass
    if "{{" in given or "{%" in given:
        return given
    raise SystemExit(f"--chat-template must be a file or a Jinja template (holding '{{{{' or '{{%'); {given!r} is neither")


def tune_kernels(model: Any, max_rows: int) -> int:
    """Time the quantized layers' ``kernel="auto"`` choices for every step size before serving.

    Otherwise each (shape, rows bucket) is timed inside the first request whose step has that size: a
    stall of up to seconds (the output head's candidates include dequantizing it). Choices are kept on
    disk per machine, so only a first start pays. Returns the number of choices known.
    """
    from ..protocol import base_linear, is_quantized
    from ..quant.kernels import tune_model

    layers = [base_linear(m) for _, m in model.linear_layers()]
    if not any(is_quantized(m) for m in layers):
        return 0
    print("llmspeed serve: timing the quantized kernels for each step size (first start on this machine only)",
          flush=True)  # fmt: skip
    return tune_model(layers, max_rows)


def build(args: argparse.Namespace) -> tuple[Any, Any]:
    """The engine and the server for parsed ``args``."""
    from .. import lora
    from .engine import Engine
    from .sampling_defaults import check_source
    from .server import OpenAIServer

    recipe = None
    if args.quantize_lm_head is not None and not args.quantize:
        flag = "--quantize-lm-head" if args.quantize_lm_head else "--no-quantize-lm-head"
        raise SystemExit(f"{flag} needs --quantize FORMAT")
    if args.group_size is not None and not args.quantize:  # else the float model would be served, silently
        raise SystemExit(f"--group-size {args.group_size} needs --quantize FORMAT (int4 or nf4)")
    if args.group_size is not None and args.quantize == "int8":  # else quantize's ValueError, after the model loaded
        raise SystemExit(f"--group-size {args.group_size} is for --quantize int4 or nf4; int8 has one scale per output "
                         f"channel: drop --group-size")  # fmt: skip
    if args.quantize:
        recipe = {"format": args.quantize, **({} if args.group_size is None else {"group_size": args.group_size})}
        if args.quantize_lm_head is False:  # quantize's default: the head at int8 per channel (docs/serving.md)
            recipe["lm_head"] = None
        if args.activations != "float":
            recipe["activations"] = args.activations
    elif args.activations != "float":  # a quantized checkpoint's layers take them (load_model refuses a float one)
        recipe = {"activations": args.activations}
    template = chat_template(args.chat_template) if args.chat_template is not None else None  # before the model loads
    try:
        check_source(args.generation_config)  # before the model loads too
    except ValueError as err:
        raise SystemExit(f"--generation-config: {err}") from None
    model = load_model(args.model, recipe, args.dtype)
    if template is not None:
        if model.tokenizer is None:
            raise SystemExit("--chat-template needs a tokenizer to render with, and this model has none")
        model.tokenizer.chat_template = template
    names = []
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--adapter takes NAME=PATH; got {spec!r}")
        lora.load_adapter(model, path, name)
        names.append(name)
    if names:
        lora.set_adapter(model, None)  # requests for the base model run without any adapter
    tune_kernels(model, args.max_batch_tokens)
    if args.seed is not None:  # an unseeded request draws its own seed from torch's global generator
        import torch

        torch.manual_seed(args.seed)
    try:
        engine = Engine(model, kv_cache_tokens=args.kv_cache_tokens, max_batch_tokens=args.max_batch_tokens,
                        max_seqs=args.max_seqs, prefix_caching=not args.no_prefix_caching, lora_dtype=args.lora_dtype,
                        kv_cache_dtype=args.kv_cache_dtype, num_scheduler_steps=args.num_scheduler_steps,
                        scheduling_policy=args.scheduling_policy, max_model_len=args.max_model_len)
    except ValueError as err:
        if "max_model_len" in str(err):  # past the model's context: named by its flag, before the server starts
            raise SystemExit(f"--max-model-len {args.max_model_len}: {err}") from None
        raise
    # the folder's own name, also for "." or "..": Path(".").name is "", Path("..").name ".."
    served = args.served_model_name or (args.model if args.model == "smollm2" else Path(os.path.abspath(args.model)).name)
    try:
        server = OpenAIServer(engine, served, names, api_key=args.api_key, tool_call_parser=args.tool_call_parser,
                              allow_runtime_lora=args.allow_runtime_lora_updating,
                              responses_store=args.enable_responses_store, generation_config=args.generation_config)
    except ValueError:
        engine.close()
        raise
    if args.enable_auto_tool_choice and server.response_template is None:
        engine.close()
        raise SystemExit("--enable-auto-tool-choice: this model has no tool-call format llmspeed knows (its tokenizer "
                         "has no response_template and it is not a Qwen 2/3 model): give --tool-call-parser hermes or a "
                         "FILE.json response template")  # fmt: skip
    if server.sampling_defaults:  # as vLLM says it: answers differ from a server with the OpenAI API's defaults
        print(f"llmspeed serve: requests that leave them out sample with the model's generation config: "
              f"{server.sampling_defaults} (--generation-config vllm for the OpenAI API's defaults)", flush=True)
    return engine, server


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, build the server and run it until interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)  # --help and bad flags need no server packages
    try:  # the serve extra, checked before a model is loaded
        import fastapi  # noqa: F401  # the server's
        import uvicorn
    except ImportError as err:
        raise SystemExit(f"python -m llmspeed serve needs fastapi and uvicorn ({err.name} is missing): "
                         f"pip install \"llmspeed[serve]\"") from err  # fmt: skip
    try:
        engine, server = build(args)
    except SystemExit as err:  # build's refusals of flags (a message): argparse's one line and exit status 2
        if not isinstance(err.code, str):
            raise
        parser.error(err.code)
    try:
        uvicorn.run(server.app(), host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.close()
    return 0
