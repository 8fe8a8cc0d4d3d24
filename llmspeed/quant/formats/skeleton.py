"""Build a model from a checkpoint without allocating its float weights, then fill it checked.

:func:`skeleton` builds the architecture of ``config.json`` with every parameter on ``meta``;
:func:`install` puts an empty quantized module (also on ``meta``) at a linear position; :func:`assign`
sets one stored tensor after checking its dtype and shape against the module's own, raising a
``ValueError`` that names the tensor; :func:`to_model_dtype` casts the float tensors of a foreign checkpoint
to the dtypes of the parameters they fill, as transformers does; :func:`finish` ties aliases, checks that
nothing is left on ``meta`` and moves the model to its device.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...model import Model
from ...precision import attach
from ..config import QuantConfig
from ..modules import module_class

# Bytes every assigned tensor is aligned to: what torch's CPU allocator gives, and what some aten kernels assume
# (torch._weight_int8pack_mm with bf16 activations crashed on an int8 weight 8 bytes off a 32-byte boundary)
ALIGN = 64


_ON_META = threading.local()  # depth: how many parameters_on_meta blocks this thread is inside
_PATCH_LOCK = threading.Lock()
_PATCH: dict[str, Any] = {"users": 0, "original": None}  # blocks open in any thread; the method they replaced


def _register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
    """``nn.Module.register_parameter`` while some thread is in :func:`parameters_on_meta`: ``meta`` for that thread's
    parameters, the original method's work for every other thread's."""
    if getattr(_ON_META, "depth", 0) > 0 and param is not None and param.device.type != "meta":
        param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
    _PATCH["original"](module, name, param)


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter this thread registers inside the block lives on ``meta``; buffers (rotary tables) stay real.

    ``nn.Module.register_parameter`` is replaced while any thread is inside such a block, and acts on the threads
    inside one only: a server thread building a module meanwhile gets real parameters, and blocks that overlap in
    two threads leave the original method in place after both.
    """
    with _PATCH_LOCK:
        if _PATCH["users"] == 0:
            _PATCH["original"] = nn.Module.register_parameter
            nn.Module.register_parameter = _register  # type: ignore[method-assign,assignment]
        _PATCH["users"] += 1
    _ON_META.depth = getattr(_ON_META, "depth", 0) + 1
    try:
        yield
    finally:
        _ON_META.depth -= 1
        with _PATCH_LOCK:
            _PATCH["users"] -= 1
            if _PATCH["users"] == 0 and nn.Module.register_parameter is _register:  # not patched again on top since
                nn.Module.register_parameter = _PATCH["original"]  # type: ignore[method-assign]


def skeleton(directory: Path, dtype: torch.dtype, config_overrides: dict[str, Any] | None = None) -> Model:
    """The architecture of ``directory/config.json`` with parameters on ``meta`` and its tokenizer, if any.

    The config's ``quantization_config`` is dropped: the caller installs the quantized modules itself.
    """
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(directory)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    for key, value in (config_overrides or {}).items():
        setattr(config, key, value)
    tokenizer = None
    if (directory / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(directory)
    generation = None
    if (directory / "generation_config.json").is_file():  # eos ids and sampling defaults, as from_pretrained reads
        generation = GenerationConfig.from_pretrained(directory)
    return from_config(config, dtype, tokenizer, directory, generation)


def from_config(config: Any, dtype: torch.dtype, tokenizer: Any, source: Path, generation: Any = None) -> Model:
    """The architecture of the transformers ``config`` with parameters on ``meta``, wrapped with ``tokenizer``
    (``None`` for none) and ``generation`` (a ``GenerationConfig``; ``None``: the one the config implies)."""
    from transformers import AutoModelForCausalLM

    with parameters_on_meta():
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if generation is not None:
        hf.generation_config = generation
    try:
        return Model(hf, tokenizer)
    except ValueError as err:  # its vocabulary does not fit: save writes no tokenizer for a model without one
        raise ValueError(
            f"{source} holds a tokenizer{' (tokenizer_config.json)' if source.is_dir() else ''} that does not fit "
            f"the model in it ({err}); an earlier save into this folder may have left it: delete the folder's "
            f"tokenizer files, or save the model with its own tokenizer (llmspeed.wrap(model, tokenizer))"
        ) from err


def install(model: Model, name: str, config: QuantConfig, bias: bool) -> nn.Module:
    """Put an empty quantized module of ``config`` (on ``meta``) at linear position ``name``; return it."""
    old = model.module.get_submodule(name)
    if not isinstance(old, nn.Linear):
        raise ValueError(
            f"{name!r} is a {type(old).__name__}, not a linear layer; it cannot hold quantized weights"
        )
    b = torch.empty(old.out_features, dtype=old.weight.dtype, device="meta") if bias else None  # model dtype
    cls: Any = module_class(config.format)  # every concrete class takes device=
    new = cls(old.in_features, old.out_features, config, b, device="meta")
    model.replace_linear(name, new)
    return new


def expected(model: Model) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer the model needs, by qualified name (meta tensors: dtype and shape)."""
    return dict(model.module.state_dict(keep_vars=True))


def to_model_dtype(tensors: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with every floating tensor cast to the dtype of the parameter or buffer it fills (``want``).

    What transformers' ``from_pretrained`` does with a checkpoint's float tensors: a bf16 norm weight in an
    fp32 checkpoint, or fp16 tensors under a bf16 ``config.json``, load in the model's dtype, so no layer
    meets an input of another dtype. Integer (packed) tensors, names the model lacks and tensors of the wrong
    shape are left as stored, for :func:`assign` to check and name. For foreign folders only: llmspeed's own
    folders keep a cast model's fp32 norms.
    """
    out = dict(tensors)
    for name, tensor in tensors.items():
        target = want.get(name)
        if target is None or tuple(tensor.shape) != tuple(target.shape):
            continue
        if tensor.is_floating_point() and target.is_floating_point():
            out[name] = tensor.to(target.dtype)
    return out


def check(name: str, tensor: torch.Tensor, want: torch.Tensor, source: Path, exact: bool = True) -> None:
    """``ValueError`` naming ``name`` when ``tensor``'s dtype or shape differs from ``want``'s.

    ``exact=False`` accepts any floating dtype for a floating ``want`` (``llmspeed.cast`` keeps norms in
    fp32 inside a bf16 model); integer buffers and a quantized module's scales always match exactly.
    """
    loose = not exact and want.dtype.is_floating_point and tensor.dtype.is_floating_point
    if (tensor.dtype != want.dtype and not loose) or tuple(tensor.shape) != tuple(want.shape):
        raise ValueError(
            f"{source}: tensor {name!r} is {str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}, "
            f"but the module needs {str(want.dtype).removeprefix('torch.')} {list(want.shape)}; "
            f"the file was modified or written for another model"
        )


def assign(
    model: Model, name: str, tensor: torch.Tensor, source: Path, want: dict[str, torch.Tensor]
) -> None:
    """Set parameter or buffer ``name`` to ``tensor`` after checking it against ``want[name]``: no copy, unless the
    tensor is not :data:`ALIGN`-byte aligned (a memory-mapped safetensors file places tensors 8 bytes apart)."""
    if name not in want:
        raise ValueError(f"{source}: tensor {name!r} matches no parameter or buffer of the model")
    owner_name, _, attr = name.rpartition(".")
    owner = model.module.get_submodule(owner_name)
    check(name, tensor, want[name], source, exact=hasattr(owner, "quant_format") and attr != "bias")
    if tensor.data_ptr() % ALIGN:  # a view into the file, which aligns tensors to 8 bytes only: own a copy
        tensor = tensor.clone()
    if attr in owner._parameters:
        old = owner._parameters[attr]
        owner._parameters[attr] = nn.Parameter(
            tensor, requires_grad=bool(old is not None and old.requires_grad)
        )
    else:
        owner._buffers[attr] = tensor
    if hasattr(owner, "_kernels"):  # a quantized module drops kernels bound to its old buffers
        owner.__dict__["_kernels"], owner.__dict__["_kernel_state"] = {}, {}


def alias_target(
    name: str, stored: str, source: Path, want: dict[str, torch.Tensor], stored_names=None
) -> None:
    """``ValueError`` unless alias ``name -> stored`` names two tensors of the model with the same dtype and
    shape (and, given ``stored_names``, ``stored`` is one of the stored tensors)."""
    for n in (name, stored):
        if n not in want:
            raise ValueError(
                f"{source}: alias {name!r} -> {stored!r} names {n!r}, which the model does not have"
            )
    if stored_names is not None and stored not in stored_names:
        raise ValueError(f"{source}: alias {name!r} -> {stored!r} points to no stored tensor")
    check(f"{name} (alias of {stored})", want[stored], want[name], source)


def alias(model: Model, name: str, stored: str, source: Path, want: dict[str, torch.Tensor]) -> None:
    """Make parameter ``name`` the same tensor as ``stored`` (tied weights), after :func:`alias_target`'s checks."""
    alias_target(name, stored, source, want)
    owner, _, attr = name.rpartition(".")
    src_owner, _, src_attr = stored.rpartition(".")
    setattr(model.module.get_submodule(owner), attr, getattr(model.module.get_submodule(src_owner), src_attr))


def tie_embeddings(model: Model) -> None:
    """Point a float output head at the input embedding when the config ties them and the file stores one."""
    hf: Any = model.module
    if not getattr(hf.config, "tie_word_embeddings", False):
        return
    head, emb = hf.get_output_embeddings(), hf.get_input_embeddings()
    if isinstance(head, nn.Linear) and head.weight.device.type == "meta" and emb.weight.device.type != "meta":
        head.weight = emb.weight


def finish_foreign(
    model: Model, tensors: dict[str, torch.Tensor], dtype: torch.dtype, device: str | torch.device, source: Path
) -> Model:
    """The rest of a foreign folder's model once its quantized layers are installed: the float ``tensors`` in the
    model's dtype (:func:`to_model_dtype`), the embedding tied, then :func:`finish`."""
    want = expected(model)
    for name, tensor in to_model_dtype(tensors, want).items():
        assign(model, name, tensor, source, want)
    tie_embeddings(model)
    return finish(model, dtype, device, source)


def finish(model: Model, dtype: torch.dtype, device: str | torch.device, source: Path) -> Model:
    """Check that no parameter or buffer is left on ``meta``, move to ``device``, attach 16-bit hooks."""
    hf = model.module
    left = [n for n, t in hf.state_dict(keep_vars=True).items() if t.device.type == "meta"]
    if left:
        raise ValueError(f"{source} lacks tensors {left[:3]} ({len(left)} in all); the folder is incomplete")
    hf.to(device)
    hf.eval()
    if dtype in (torch.bfloat16, torch.float16):  # the tensors are back; a cast's run-time hooks are not
        attach(model, dtype)
    return model


def take(tensors: dict, key: str, dtypes: tuple[torch.dtype, ...], shape: tuple[int, ...], source: Path,
         fmt: str) -> torch.Tensor:  # fmt: skip
    """Pop tensor ``key`` of a ``fmt`` folder (``"GPTQ"``, ``"AWQ"``) after checking its dtype and shape; a missing or
    mismatched one is a ``ValueError`` naming it and what the format needs."""
    t = tensors.pop(key, None)
    if t is None:
        raise ValueError(f"{source}: tensor {key!r} is missing")
    if t.dtype not in dtypes or tuple(t.shape) != shape:
        names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{source}: tensor {key!r} is {str(t.dtype).removeprefix('torch.')} {list(t.shape)}; "
                         f"{fmt} needs {names} {list(shape)}")  # fmt: skip
    return t


def load_packed(directory: Path, dtype: torch.dtype, device: str | torch.device, fmt: str,
                layer: Callable[[str, Any, dict], tuple[QuantConfig, dict[str, torch.Tensor]]]) -> Model:  # fmt: skip
    """A ``fmt`` folder whose quantized linears are ``<name>.qweight`` tensors and their companions: each installed
    as the module ``layer(name, linear, tensors)`` describes (its config and buffers; it pops its tensors), the
    float rest by :func:`finish_foreign`."""
    from .files import read_all

    tensors = read_all(directory)
    model = skeleton(directory, dtype)
    layers = dict(model.linear_layers())
    names = sorted(k.removesuffix(".qweight") for k in tensors if k.endswith(".qweight"))
    if not names:
        raise ValueError(f"{directory} is marked {fmt} but holds no '.qweight' tensor")
    for name in names:
        if name not in layers:
            raise ValueError(f"{directory}: tensor {name + '.qweight'!r} names no linear layer of the model")
        cfg, buffers = layer(name, layers[name], tensors)
        module = install(model, name, cfg, bias=f"{name}.bias" in tensors)
        want = {f"{name}.{k}": v for k, v in module.state_dict(keep_vars=True).items()}
        for buf, t in buffers.items():
            assign(model, f"{name}.{buf}", t.contiguous(), directory, want)
    return finish_foreign(model, tensors, dtype, device, directory)
