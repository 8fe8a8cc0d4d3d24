"""LoRA adapters over frozen float or quantized bases (QLoRA): train, merge, batch, save in PEFT's format.

::

    from llmspeed import lora
    lora.add_adapter(model, "sql", r=16, alpha=32, targets="all-linear")
    lora.finetune(model, texts, steps=200, lr=2e-4, seq_len=256, batch_size=8)
    lora.save_adapter(model, "out/sql", "sql"); lora.load_adapter(model, "out/sql", "sql2")
    lora.set_adapter(model, "sql")
    with lora.disabled(model): ...                       # base model alone
    with lora.per_token_adapters(model, names): model.forward_batch(...)   # one adapter per token
    lora.merge(model, "sql"); lora.unmerge(model, "sql")
    lora.delete_adapter(model, "sql2")                   # merge_and_unload refuses to drop an adapter silently
    lora.merge_and_unload(model, "sql"); llmspeed.save(model, "out/merged")   # a plain model again
"""

from .batching import per_row_adapters, per_token_adapters
from .config import LoraConfig
from .inject import (
    active_adapter,
    adapter_names,
    add_adapter,
    delete_adapter,
    disabled,
    lora_layers,
    resolve_targets,
    set_adapter,
    trainable_parameters,
)
from .io import load_adapter, save_adapter
from .layer import LoraLinear
from .merge import MergeReport, merge, merge_and_unload, unmerge
from .train import FinetuneResult, finetune

__all__ = [
    "LoraConfig",
    "LoraLinear",
    "MergeReport",
    "FinetuneResult",
    "add_adapter",
    "delete_adapter",
    "adapter_names",
    "active_adapter",
    "set_adapter",
    "disabled",
    "lora_layers",
    "resolve_targets",
    "trainable_parameters",
    "finetune",
    "save_adapter",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "unmerge",
    "per_token_adapters",
    "per_row_adapters",
]
