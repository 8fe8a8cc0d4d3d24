"""llmspeed: LLM inference-optimization primitives over one model-wrapper protocol.

Top-level names::

    llmspeed.wrap(hf_model, tokenizer) -> Model     llmspeed.models.smollm2()
    llmspeed.cast(model, "bf16")                    llmspeed.autocast(model, "bf16")
    llmspeed.memory_footprint(model)                llmspeed.eval.perplexity(model, text)
    llmspeed.quantize(model, "int4")                llmspeed.save / llmspeed.load / llmspeed.kernels
    llmspeed.lora                                   llmspeed.Generator, llmspeed.SamplingParams
    llmspeed.StructuredOutputsParams                (JSON schema, regex, choice or grammar outputs)
    llmspeed.Engine(model).submit(prompt)           (threads and asyncio share one engine)

Modules are imported on first use, so ``import llmspeed`` stays cheap and one module's
import cost is never paid by users of another.
"""

from __future__ import annotations

import importlib
from typing import Any

from .memory import memory_footprint
from .model import Model, wrap
from .precision import autocast, cast
from .protocol import AttentionBackend, CausalLM, ModelSpec

__version__ = "0.1.0"

# name -> module that defines it, imported lazily on first attribute access
_LAZY = {
    "models": "llmspeed.models",
    "eval": "llmspeed.eval",
    "quant": "llmspeed.quant",
    "lora": "llmspeed.lora",
    "generation": "llmspeed.generation",
    "bench": "llmspeed.bench",
    "quantize": "llmspeed.quant",
    "save": "llmspeed.quant",
    "load": "llmspeed.quant",
    "kernels": "llmspeed.quant.report",
    "Generator": "llmspeed.generation",
    "SamplingParams": "llmspeed.generation",
    "StructuredOutputsParams": "llmspeed.generation",
    "GenerationOutput": "llmspeed.generation",
    "serving": "llmspeed.serving",
    "Engine": "llmspeed.serving",
    "qat": "llmspeed.qat",
    "training": "llmspeed.training",
    "finetune": "llmspeed.trainer",
    "names": "llmspeed.names",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'llmspeed' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = module if module.__name__ == f"llmspeed.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Model",
    "ModelSpec",
    "CausalLM",
    "AttentionBackend",
    "wrap",
    "cast",
    "autocast",
    "memory_footprint",
    *_LAZY,
]
