"""``save``/``load``: a quantized (or float) model as one safetensors file + its config and tokenizer.

Folder layout written by :func:`save`::

    model.safetensors   every parameter and persistent buffer (packed codes, scales, zeros, float weights);
                        metadata: {"format": "llmspeed", "version": "1", "dtype", "quantization": JSON
                        {layer name: QuantConfig.to_dict()}, "aliases": JSON {tied name: stored name}}
    config.json         the transformers config (the architecture to rebuild)
    tokenizer files     when the model has a tokenizer

:func:`load` builds the architecture with its parameters on the ``meta`` device (no float weight is
allocated or initialised), puts empty quantized skeletons at the quantized positions, then assigns the
stored tensors: the result is bit-exact.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..model import Model
from ..precision import attach
from ..protocol import CausalLM
from .config import QuantConfig
from .modules import QuantizedLinearBase, module_class

WEIGHTS = "model.safetensors"
FORMAT = "llmspeed"
VERSION = "1"


def save(model: CausalLM, directory: str | Path) -> Path:
    """Write ``model`` (quantized or not) to ``directory``; return the folder path."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    root = model.module
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_by_storage: dict[tuple, str] = {}
    for name, tensor in root.state_dict().items():
        key = (
            str(tensor.device),
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
        )
        if key in first_by_storage:
            aliases[name] = first_by_storage[key]
            continue
        first_by_storage[key] = name
        tensors[name] = tensor.detach().to("cpu").contiguous()
    quant = {
        name: m.config.to_dict() for name, m in model.linear_layers() if isinstance(m, QuantizedLinearBase)
    }
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": str(model.spec.dtype).removeprefix("torch."),
        "quantization": json.dumps(quant),
        "aliases": json.dumps(aliases),
    }
    save_file(tensors, str(directory / WEIGHTS), metadata=metadata)
    config = getattr(root, "config", None)
    if config is not None:
        config.save_pretrained(directory)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(directory)
    return directory


def _not_checkpoint(directory: Path, why: str) -> ValueError:
    return ValueError(
        f"{directory} is not an llmspeed checkpoint ({why}); write one with llmspeed.save(model, directory), "
        f"or load a plain transformers folder with llmspeed.wrap(AutoModelForCausalLM.from_pretrained(...))"
    )


def _read_metadata(directory: Path) -> dict[str, str]:
    from safetensors import safe_open

    if not directory.is_dir():
        raise _not_checkpoint(directory, "no such folder")
    path = directory / WEIGHTS
    if not path.is_file() or not (directory / "config.json").is_file():
        raise _not_checkpoint(directory, f"it needs {WEIGHTS} and config.json")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error type for bad headers
        raise ValueError(f"{path} is corrupt or truncated ({err}); save the model again") from err
    if metadata.get("format") != FORMAT:
        raise _not_checkpoint(directory, f"{WEIGHTS} has no llmspeed metadata")
    if metadata.get("version") != VERSION:
        raise ValueError(
            f"{path} has llmspeed format version {metadata.get('version')!r}; this llmspeed reads {VERSION!r}"
        )
    return metadata


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:
        raise ValueError(f"{path} is corrupt or truncated ({err}); save the model again") from err


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside the block lives on ``meta``; buffers (rotary tables) stay real."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def load(directory: str | Path, device: str | torch.device = "cpu") -> Model:
    """Rebuild the model :func:`save` wrote to ``directory``, bit-exact, on ``device``.

    Raises:
        ValueError: the folder is not an llmspeed checkpoint, or its tensors are corrupt, truncated,
            missing or of the wrong shape.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    metadata = _read_metadata(directory)
    try:
        quant = {
            name: QuantConfig.from_dict(cfg) for name, cfg in json.loads(metadata["quantization"]).items()
        }
        aliases: dict[str, str] = json.loads(metadata["aliases"])
        dtype = getattr(torch, metadata["dtype"])
    except (KeyError, ValueError, AttributeError, TypeError) as err:
        raise ValueError(
            f"{directory / WEIGHTS} has unreadable llmspeed metadata ({err}); save the model again"
        ) from err
    tensors = _read_tensors(directory / WEIGHTS)
    config = AutoConfig.from_pretrained(directory)
    with _parameters_on_meta():
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tokenizer = None
    if (directory / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(directory)
    model = Model(hf, tokenizer)
    for name, cfg in quant.items():
        old = hf.get_submodule(name)
        bias = torch.empty(old.out_features, device="meta") if f"{name}.bias" in tensors else None
        model.replace_linear(
            name, module_class(cfg.format)(old.in_features, old.out_features, cfg, bias, device="meta")
        )
    expected = set(hf.state_dict()) - set(aliases)
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{directory / WEIGHTS} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}; "
            f"the folder was modified after llmspeed.save"
        )
    try:
        hf.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as err:
        raise ValueError(
            f"{directory / WEIGHTS} has tensors of the wrong shape ({err}); save the model again"
        ) from err
    for alias, stored in aliases.items():
        owner, _, attr = alias.rpartition(".")
        src_owner, _, src_attr = stored.rpartition(".")
        setattr(hf.get_submodule(owner), attr, getattr(hf.get_submodule(src_owner), src_attr))
    left = [n for n, p in hf.named_parameters() if p.device.type == "meta"]
    if left:
        raise ValueError(f"{directory / WEIGHTS} lacks parameters {left[:3]}; save the model again")
    hf.to(device)
    hf.eval()
    if dtype in (torch.bfloat16, torch.float16):  # the tensors are back; a cast's run-time hooks are not
        attach(model, dtype)
    return model
