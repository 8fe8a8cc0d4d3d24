"""``from_pretrained``: a local transformers folder, optionally quantized while it is read.

With ``quantize=...`` each linear weight is quantized (round to nearest) the moment it is read and
dropped right after: tensors are read one at a time with plain file reads (no memory map), into a model
whose parameters start on ``meta``. Peak memory is then the packed model, the float embeddings and
norms, and one float weight, instead of the whole float model plus its quantized copy. The packed
tensors are bit for bit those of loading the float model and calling :func:`llmspeed.quantize`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..model import Model
from ..names import check_device, folder_path, format_name
from ..precision.cast import DTYPES, resolve_dtype

FLOAT64_NAMES = ("double", "float64", "fp64")  # cast() has no 64-bit target, but a float64 load is exact
QUANTIZE_KEYS = ("format", "group_size", "symmetric", "double_quant", "kernel", "skip", "include", "activations",
                 "share_embedding", "int8_layers", "lm_head")


def _quant_plan(model: Model, options: dict[str, Any], head: str | None):
    """``{layer name: QuantConfig}`` from the ``quantize`` dict (the keys of :data:`QUANTIZE_KEYS`); ``head``: the
    tied output head's name (:func:`_tied_head_name`)."""
    from ..quant.api import DEFAULT_LM_HEAD, plan_layers
    from ..quant.config import DEFAULT_GROUP_SIZE, QuantConfig
    from ..quant.embedding import unshareable
    from ..quant.kernels import check_kernel

    if not isinstance(options, dict) or "format" not in options:
        raise ValueError(
            f"quantize must be a dict with at least 'format' (keys: {list(QUANTIZE_KEYS)}); got {options!r}"
        )
    unknown = sorted(set(options) - set(QUANTIZE_KEYS))
    if unknown:
        raise ValueError(
            f"quantize has unknown keys {unknown}; accepted: {list(QUANTIZE_KEYS)} (calibrated methods such as "
            f"gptq need the whole model: load it, then call llmspeed.quantize)"
        )
    fmt = format_name(options["format"])
    if not isinstance(fmt, str) or fmt not in DEFAULT_GROUP_SIZE:  # a list or dict is unhashable: no `in` test
        raise ValueError(f"quantize['format'] must be one of {sorted(DEFAULT_GROUP_SIZE)}; got {fmt!r}")
    config = QuantConfig(
        fmt,
        options.get("group_size", DEFAULT_GROUP_SIZE[fmt]),
        options.get("double_quant", False),
        "rtn",
        options.get("kernel", "auto"),
        options.get("symmetric"),
        activations=format_name(options.get("activations", "float")),
    )
    check_kernel(config.kernel, fmt, "cpu")
    plan = plan_layers(model, config, options.get("skip"), options.get("include"), options.get("int8_layers"),
                       options.get("lm_head", DEFAULT_LM_HEAD))
    share = options.get("share_embedding")
    if share not in (None, True, False):
        raise ValueError(f"quantize['share_embedding'] must be None, True or False; got {share!r}")
    why_not = unshareable(plan[head]) if head in plan else None
    if share and (head not in plan or why_not):
        raise ValueError("quantize['share_embedding']=True needs an output head tied to the input embedding "
                         "(tie_word_embeddings in config.json) and quantized (lm_head='int8')"
                         + (f"; {why_not} cannot serve as the embedding" if why_not else ""))  # fmt: skip
    return plan


def _tied_head_name(model: Model, files: list[Path]) -> str | None:
    """The output head's name when it is tied to the input embedding as transformers ties it: the config says so
    and ``files`` store no head weight, or one equal to the embedding's (transformers leaves a head stored with
    values of its own untied, warning that the config says otherwise)."""
    hf = model.hf  # model.module, typed as the transformers model it is
    if not getattr(hf.config, "tie_word_embeddings", False):
        return None
    head, emb = hf.get_output_embeddings(), hf.get_input_embeddings()
    name = next((n for n, m in hf.named_modules() if m is head), None)
    emb_name = next((n for n, m in hf.named_modules() if m is emb), None)
    if name is None or emb_name is None:
        return name
    stored_head, stored_emb = _stored(files, f"{name}.weight"), _stored(files, f"{emb_name}.weight")
    if stored_head is None or stored_emb is None:
        return name
    same = stored_head.shape == stored_emb.shape and torch.equal(stored_head, stored_emb)
    return name if same else None


def _stored(files: list[Path], key: str) -> torch.Tensor | None:
    """Tensor ``key`` of the first of ``files`` that stores it (memory-mapped), or ``None``."""
    from safetensors import safe_open

    for path in files:
        with safe_open(str(path), framework="pt") as f:
            if key in f.keys():
                return f.get_tensor(key)
    return None


def _keys(files: list[Path]) -> set[str]:
    from safetensors import safe_open

    keys: set[str] = set()
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            keys.update(f.keys())
    return keys


def from_pretrained(
    path: str | Path,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    quantize: dict[str, Any] | None = None,
) -> Model:
    """Load the float transformers checkpoint in folder ``path`` (safetensors, one file or shards).

    Args:
        path: A folder ``save_pretrained`` wrote (``config.json``, ``*.safetensors``, tokenizer files).
        dtype: Weight dtype, as in ``AutoModelForCausalLM.from_pretrained(path, dtype=dtype)``, or its name
            (``"bf16"``, ``"bfloat16"``, ...: :mod:`llmspeed.names`; ``"float64"``, ``"fp64"``, ``"double"`` for
            ``torch.float64``). A 16-bit model comes back with the run-time hooks :func:`llmspeed.cast` gives one
            (:func:`llmspeed.precision.attach`: norm outputs rounded, and on the CPU each linear choosing per call
            between the native and the upcast matmul).
        device: Where the model ends up (quantization runs on the CPU as tensors are read).
        quantize: ``None``, or ``dict(format="int4", group_size=64, symmetric=..., skip=[...], include=[...],
            double_quant=..., kernel=..., activations=..., share_embedding=..., int8_layers=[...], lm_head=...)``: the arguments of
            :func:`llmspeed.quantize` with method ``"rtn"``,
            applied to each linear layer as its weight is read, one shard and one layer at a time.

    Raises:
        ValueError: not a float transformers folder (quantized folders load with :func:`llmspeed.load`),
            bad ``quantize`` options, or tensors that do not fit the architecture (named).
    """
    from ..quant.formats import detect, skeleton
    from ..quant.formats.files import shard_files, stream_tensors
    from ..quant.methods.rtn import rtn_weight
    from ..quant.modules import module_class

    folder = folder_path(path, "path")
    check_device(device)
    given = dtype
    if isinstance(dtype, str):  # "bfloat16", "bf16", "half": the spellings cast accepts; "float64" as torch.float64
        key = dtype.strip().lower().removeprefix("torch.")
        try:
            dtype = torch.float64 if key in FLOAT64_NAMES else resolve_dtype(dtype)
        except ValueError:
            pass  # still a str: refused below
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype.itemsize >= 2):  # fp8: no storage
        raise ValueError(f"dtype must be a floating-point torch dtype of 16 bits or more (torch.float32, "
                         f"torch.bfloat16, torch.float16, torch.float64) or one of the names "
                         f"{sorted([*DTYPES, *FLOAT64_NAMES])}; got {given!r}")
    kind = detect(folder)
    if kind != "float":
        raise ValueError(f"{folder} is a {kind} checkpoint; load it with llmspeed.load(path)")
    files = shard_files(folder)
    model = skeleton.skeleton(folder, dtype)
    head = _tied_head_name(model, files) if quantize is not None else None  # only a quantized head shares
    plan = _quant_plan(model, quantize, head) if quantize is not None else {}
    keys = _keys(files)
    for name, config in plan.items():
        skeleton.install(model, name, config, bias=f"{name}.bias" in keys)
    want = skeleton.expected(model)
    weights = {f"{name}.weight": name for name in plan}
    for file in files:
        for key, tensor in stream_tensors(file):
            if tensor.is_floating_point():
                tensor = tensor.to(dtype)
            layer = weights.get(key)
            if layer is None:
                skeleton.assign(model, key, tensor, file, want)
                continue
            _quantize_into(model, layer, plan[layer], tensor, file, want, rtn_weight, module_class)
            del tensor  # the float weight is gone before the next one is read
    _quantize_tied_head(model, plan, want, rtn_weight, module_class, folder)
    if head is not None and head in plan and (quantize or {}).get("share_embedding") is not False:
        from ..quant.embedding import share_tied_embedding, unshareable

        if unshareable(plan[head]) is None:  # an NF4 head with double_quant keeps the float embedding
            share_tied_embedding(model, head)  # the float embedding is dropped: the packed head serves both
    skeleton.tie_embeddings(model)
    return skeleton.finish(model, dtype, device, folder)


def _quantize_into(model, layer, config, weight, source, want, rtn_weight, module_class) -> None:
    """Quantize ``weight`` [out, in] with round-to-nearest and assign the packed buffers to ``layer``'s skeleton."""
    from ..quant.formats import skeleton  # quant is imported on first use, not with llmspeed.models

    target = model.module.get_submodule(layer)
    skeleton.check(f"{layer}.weight", weight, torch.empty(target.out_features, target.in_features, dtype=weight.dtype,
                                                          device="meta"), source)  # fmt: skip
    qw = rtn_weight(weight, config)
    built = module_class(config.format).from_codes(
        qw.codes, qw.scales, qw.zeros, config=config, bias=None, in_features=target.in_features
    )
    for buf, value in built.state_dict().items():
        skeleton.assign(model, f"{layer}.{buf}", value, source, want)


def _quantize_tied_head(model, plan, want, rtn_weight, module_class, source) -> None:
    """A quantized output head whose weight the file leaves to the tied input embedding."""
    hf = model.module
    for layer in plan:
        module = hf.get_submodule(layer)
        if module.qweight.device.type == "meta" and getattr(hf.config, "tie_word_embeddings", False):
            emb = hf.get_input_embeddings().weight
            if module is hf.get_output_embeddings() and emb.device.type != "meta":
                _quantize_into(
                    model, layer, plan[layer], emb.detach(), source, want, rtn_weight, module_class
                )
