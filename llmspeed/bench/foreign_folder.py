"""Write a quantized checkpoint folder in another library's layout: the part every such writer shares (the float
tensors, the config with its ``quantization_config``, the tokenizer); :mod:`.gptq_folder` and :mod:`.awq_folder`
give each quantized linear's tensors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..protocol import CausalLM


def write_foreign_folder(model: CausalLM, path: str | Path, layer: Callable[[torch.Tensor], dict[str, torch.Tensor]],
                         quantization_config: dict[str, Any], skip: tuple[str, ...] = ()) -> Path:  # fmt: skip
    """Write the float ``model`` at ``path`` with each linear (all but the output head and those whose name
    contains one of ``skip``) stored as ``layer(weight)``'s tensors, and ``quantization_config`` in ``config.json``."""
    from safetensors.torch import save_file

    root: Any = model.module
    head = root.get_output_embeddings()
    quantized = [n for n, m in model.linear_layers() if m is not head and not any(s in n for s in skip)]
    prefixes = tuple(f"{n}." for n in quantized)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in root.state_dict().items():
        if t.untyped_storage().data_ptr() in seen:  # a tied head: transformers re-ties it from the config
            continue
        seen.add(t.untyped_storage().data_ptr())
        if not name.startswith(prefixes) or name.endswith(".bias"):
            tensors[name] = t.detach().contiguous()
    for name in quantized:
        tensors.update({f"{name}.{k}": v for k, v in layer(root.get_submodule(name).weight).items()})
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    root.config.save_pretrained(path)
    data = json.loads((path / "config.json").read_text())
    data["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(path)
    return path


__all__ = ["write_foreign_folder"]
