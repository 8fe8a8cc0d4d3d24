"""Adapter files in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are PEFT's: ``base_model.model.<position>.lora_A.weight`` (``[r, in]``) and
``...lora_B.weight`` (``[out, r]``), where ``<position>`` is the module path inside the
transformers model; the adapter name is not part of the key. The config carries PEFT's field
names (``r``, ``lora_alpha``, ``target_modules``, ``use_rslora``, ``rank_pattern``, ...), so
``peft.PeftModel.from_pretrained(hf_model, path)`` loads what :func:`save_adapter` writes and
:func:`load_adapter` reads what PEFT saved (plain LoRA on linear layers; DoRA, biases, embeddings,
``modules_to_save``, activated LoRA, QA-LoRA, layer replication and adapters of a changed base (``init_lora_weights``
PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA, unless converted) are refused with an error naming the field).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import cast

import torch

from ..names import folder_path
from ..protocol import CausalLM, holds_step_lock
from .config import LoraConfig, adapter_dtype
from .inject import (
    active_adapter,
    adapter_names,
    attach,
    delete_adapter,
    registry,
    require_adapter,
    resolve_targets,
    set_adapter,
    wrapped,
)
from .layer import LoraLinear, check_adapter_name

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"(?P<pos>.+)\.(?P<mat>lora_A|lora_B)\.weight")
# init_lora_weights values whose adapters were trained on a changed base (W - scale * B0 A0, or LoftQ's quantized W):
# the file alone does not hold that base (PEFT rebuilds it while loading), so they are refused unless converted
RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _target_modules(model: CausalLM, positions: tuple[str, ...]) -> list[str]:
    """Leaf names (``["q_proj", ...]``) when they select exactly ``positions``, else the full names."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in positions})
    if set(resolve_targets(model, leaves)) == set(positions):
        return leaves
    return sorted(positions)


@holds_step_lock
def save_adapter(model: CausalLM, path: str | Path, name: str) -> Path:
    """Write adapter ``name`` to folder ``path`` (created if needed) in PEFT's format; return the folder. Holds the model's
    step lock (:func:`~llmspeed.protocol.step_lock`), so that a step or verb in another thread never hands it a
    half-changed adapter."""
    from safetensors.torch import save_file

    model = wrapped(model)  # the transformers model add_adapter took, too
    folder = folder_path(path, "path", write=True)
    info = require_adapter(model, name)
    root = model.module
    config = info.config
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for pos in info.positions:
        layer = cast(LoraLinear, root.get_submodule(pos))
        a, b = layer.weight_a(name), layer.weight_b(name)  # [r, in], [out, r]
        tensors[f"{PREFIX}{pos}.lora_A.weight"] = a.detach().cpu().contiguous()
        tensors[f"{PREFIX}{pos}.lora_B.weight"] = b.detach().cpu().contiguous()
        rank = a.shape[0]
        alpha = layer.scaling[name] * (math.sqrt(rank) if config.use_rslora else rank)
        if rank != config.r:
            rank_pattern[pos] = rank
        if not math.isclose(alpha, config.alpha, rel_tol=1e-6):
            alpha_pattern[pos] = alpha
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": getattr(getattr(root, "config", None), "name_or_path", None) or None,
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": _target_modules(model, info.positions),
        "use_rslora": config.use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_dora": False,
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2) + "\n")
    return folder


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file() or not (folder / WEIGHTS_FILE).is_file():
        pickled = path.is_file() and (folder / "adapter_model.bin").is_file()
        raise FileNotFoundError(
            f"path must be a folder holding {CONFIG_FILE} and {WEIGHTS_FILE}; got {str(folder)!r}"
            + (", which holds adapter_model.bin, a pickle llmspeed does not load (code can hide in one): write "
               "safetensors with PEFT, PeftModel.from_pretrained(base, path).save_pretrained(new_path)"
               if pickled else "")
        )
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); save the adapter again") from err
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a JSON object (PEFT's LoraConfig fields); got a {type(cfg).__name__}")
    for field in ("alpha_pattern", "rank_pattern"):
        pattern = cfg.get(field) or {}
        if not isinstance(pattern, dict):
            raise ValueError(f"{path} field {field} must be an object of module patterns; got {pattern!r}")
        for key in pattern:
            try:
                re.compile(key)
            except re.error as err:
                raise ValueError(f"{path} field {field} has {key!r}, which is not a regular expression ({err})") from err
    for key, value in (cfg.get("alpha_pattern") or {}).items():  # a NaN alpha would give NaN logits
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(
                f"{path} field alpha_pattern must map module patterns to finite numbers; got {key!r}: {value!r}"
            )
    params = cfg.get("target_parameters") or []
    if not isinstance(params, list) or not all(isinstance(t, str) for t in params):
        raise ValueError(f"{path} field target_parameters must be a list of parameter names; got {params!r}")
    for field in ("use_rslora", "use_dora", "fan_in_fan_out"):  # bool("no") would be True
        if not isinstance(cfg.get(field, False), bool):
            raise ValueError(f"{path} field {field} must be a JSON boolean (true or false); got {cfg[field]!r}")
    checks = {
        "peft_type": (cfg.get("peft_type", "LORA"), "LORA"),
        "use_dora": (cfg.get("use_dora", False), False),
        "bias": (cfg.get("bias", "none"), "none"),
        "fan_in_fan_out": (cfg.get("fan_in_fan_out", False), False),
        "modules_to_save": (bool(cfg.get("modules_to_save")), False),
        "lora_bias": (bool(cfg.get("lora_bias")), False),
        "alora_invocation_tokens": (bool(cfg.get("alora_invocation_tokens")), False),  # active after them only
        "layer_replication": (bool(cfg.get("layer_replication")), False),  # keys name replicated layers
        # LoRA variants that compute something else from the same keys (or add their own tensors)
        "use_bdlora": (bool(cfg.get("use_bdlora")), False),  # block-diagonal A or B
        "kasa_config": (bool(cfg.get("kasa_config")), False),
        "velora_config": (bool(cfg.get("velora_config")), False),
        "monteclora_config": (bool(cfg.get("monteclora_config")), False),
        "arrow_config": (bool(cfg.get("arrow_config")), False),  # a router over other adapters
    }
    for field, (got, supported) in checks.items():
        if got != supported:
            raise ValueError(
                f"{CONFIG_FILE} field {field}={cfg.get(field)!r} is not supported; llmspeed loads plain LoRA"
            )
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(RESIDUAL_INITS):
        raise ValueError(
            f"{CONFIG_FILE} field init_lora_weights={init!r} is not supported: such an adapter was trained on base "
            f"weights PEFT changed (the residual of its initial B A), which this file does not hold; save it with "
            f"PEFT's save_pretrained(path, path_initial_model_for_weight_conversion=...) to get a plain LoRA of the "
            f"original base, which llmspeed loads (accepted: true, false, 'gaussian', 'orthogonal', 'eva', 'mica')"
        )
    return cfg


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``path``; ``ValueError`` naming the file when it is not a readable safetensors file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}); save the adapter again") from err


def _pattern_value(pattern: dict, pos: str, default):
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", pos):
            return value
    return default


@holds_step_lock
def load_adapter(
    model: CausalLM, path: str | Path, name: str, dtype: torch.dtype | str = torch.float32
) -> LoraConfig:
    """Load the adapter in folder ``path`` (ours or PEFT's) onto ``model`` as ``name`` and activate it.

    Args:
        model: The model to add the adapter to (float or quantized base).
        path: The adapter folder.
        name: A new adapter name.
        dtype: Dtype of the adapter matrices: fp32, bf16, fp16 or fp64, as a torch dtype or a name (``"bf16"``).

    Raises:
        FileNotFoundError: the folder lacks the two files.
        ValueError: ``name`` exists already, ``dtype`` is not a floating-point dtype, the file uses
            unsupported PEFT features, or its tensors name positions this model lacks or have shapes
            that do not fit. All or nothing: on any error the model is left as it was (no wrapped
            layer, registry entry, active adapter or frozen flag changes).
    """
    model = wrapped(model)  # the transformers model add_adapter takes, too
    check_adapter_name(name)
    dtype = adapter_dtype(dtype)  # "bf16", torch.float16, ...; float8 and integer dtypes are refused here
    if name in registry(model):
        raise ValueError(f"adapter {name!r} already exists on this model (adapters: {adapter_names(model)})")
    folder = folder_path(path, "path")
    cfg = _read_config(folder)
    tensors = _read_weights(folder / WEIGHTS_FILE)
    layers = dict(model.linear_layers())
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key.removeprefix(PREFIX))
        if key.endswith(".base_layer.weight"):  # PEFT loads it over the model's own weight
            raise ValueError(
                f"{WEIGHTS_FILE} holds {key!r}, a base weight PEFT saves beside the adapter when target_modules "
                f"names lm_head or an embedding (save_embedding_layers, on by default then); llmspeed loads LoRA "
                f"matrices only: if the vocabulary was not resized, save with PEFT's "
                f"save_pretrained(path, save_embedding_layers=False)"
            )
        if not key.startswith(PREFIX) or match is None:
            raise ValueError(f"{WEIGHTS_FILE} holds {key!r}, which is not a LoRA matrix of a linear layer")
        found.setdefault(match["pos"], {})[match["mat"]] = tensor
    raw = {"r": cfg.get("r", 8), "lora_alpha": cfg.get("lora_alpha", 8), "lora_dropout": cfg.get("lora_dropout", 0.0)}
    # JSON numbers only: float() and int() would take "16" or true (alpha 1.0) and cut r=4.5 to 4, silently
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw.values()) or (
        isinstance(raw["r"], float) and not raw["r"].is_integer()
    ):
        raise ValueError(
            f"{folder / CONFIG_FILE} fields r, lora_alpha and lora_dropout must be numbers (r an integer); got "
            f"r={raw['r']!r}, lora_alpha={raw['lora_alpha']!r}, lora_dropout={raw['lora_dropout']!r}"
        )
    r, alpha, dropout, rslora = int(raw["r"]), float(raw["lora_alpha"]), float(raw["lora_dropout"]), cfg.get("use_rslora", False)
    params = cfg.get("target_parameters") or []  # checked by _read_config: a list of names
    shapes: dict[str, tuple[int, float]] = {}
    mismatch = None  # the first layer whose rank the config contradicts, refused once the config's own fields passed
    for pos, mats in found.items():
        if pos not in layers:
            raise ValueError(f"the adapter was saved for module {pos!r}, which this model does not have")
        if set(mats) != {"lora_A", "lora_B"}:
            raise ValueError(
                f"module {pos!r} has {sorted(mats)} in {WEIGHTS_FILE}; both lora_A and lora_B are needed"
            )
        layer = layers[pos]
        a, b = mats["lora_A"], mats["lora_B"]
        for mat, t in mats.items():
            if not t.is_floating_point():
                raise ValueError(
                    f"{folder / WEIGHTS_FILE}: {mat} of {pos!r} is {str(t.dtype).removeprefix('torch.')}; LoRA "
                    f"matrices must be floating point (float32, bfloat16 or float16): the file is damaged"
                )
        if a.dim() != 2 or b.dim() != 2:  # a scalar lora_A has no rank to read
            raise ValueError(
                f"{folder / WEIGHTS_FILE}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} of {pos!r} must be "
                f"matrices ([r, in] and [out, r]): the file is damaged"
            )
        rank = a.shape[0]
        if rank == 0:
            raise ValueError(f"{folder / WEIGHTS_FILE}: lora_A of {pos!r} has rank 0; an adapter needs rank >= 1")
        want_a, want_b = (rank, layer.in_features), (layer.out_features, rank)
        if cfg.get("use_qalora") is True and tuple(a.shape) != want_a:  # PEFT's QA-LoRA on a GPTQ layer
            raise ValueError(
                f"{CONFIG_FILE} field use_qalora=True is not supported: QA-LoRA averages each group of "
                f"qalora_group_size={cfg.get('qalora_group_size', 16)!r} inputs before lora_A (here {tuple(a.shape)} "
                f"at {pos!r}, in={layer.in_features}); llmspeed loads plain LoRA"
            )
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise ValueError(
                f"adapter shapes do not fit this model at {pos!r}: lora_A {tuple(a.shape)} and lora_B "
                f"{tuple(b.shape)}, but the layer needs {want_a} and {want_b} (in={layer.in_features}, "
                f"out={layer.out_features}); was it trained for another model?"
            )
        # PEFT matches alpha_pattern against the weight's name ("<pos>.weight") where target_parameters wrapped it
        weight = f"{pos}.weight"
        key = weight if any(weight == t or weight.endswith("." + t) for t in params) else pos
        layer_alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, key, alpha))
        # the rank the config gives this layer (rank_pattern, else r), as PEFT builds the layer before loading into it
        matched = [v for k, v in (cfg.get("rank_pattern") or {}).items() if re.match(rf"(.*\.)?({k})$", key)]
        if rank not in (matched or [r]) and mismatch is None:  # PEFT refuses the size mismatch
            field, want = ("rank_pattern", matched[0] if len(matched) == 1 else matched) if matched else ("r", r)
            mismatch = (f"{folder / WEIGHTS_FILE}: lora_A of {pos!r} has rank {rank}, but {folder / CONFIG_FILE} field "
                        f"{field} gives it rank {want}: the config does not describe these matrices (its scale "
                        f"alpha / r would be another adapter's)")
        shapes[pos] = (rank, layer_alpha / (math.sqrt(rank) if rslora else rank))
    if not shapes:
        raise ValueError(f"{WEIGHTS_FILE} in {str(folder)!r} holds no LoRA matrices")
    targets = cfg.get("target_modules") or tuple(shapes)
    try:
        config = LoraConfig(r=r, alpha=alpha, targets=targets, dropout=dropout, use_rslora=rslora)
    except ValueError as err:  # LoraConfig's message names its own field (r, alpha, ...) and the value
        field = str(err).split(" ", 1)[0]
        field = {"alpha": "lora_alpha", "dropout": "lora_dropout", "targets": "target_modules"}.get(field, field)
        raise ValueError(f"{folder / CONFIG_FILE} field {field}: {err}") from err
    if mismatch is not None:
        raise ValueError(mismatch)
    previous = active_adapter(model)
    grads = {p: p.requires_grad for p in model.module.parameters()}
    try:
        attach(model, name, config, shapes, dtype)
        with torch.no_grad():
            for pos, mats in found.items():
                layer = cast(LoraLinear, model.module.get_submodule(pos))
                layer.weight_a(name).copy_(mats["lora_A"])
                layer.weight_b(name).copy_(mats["lora_B"])
    except BaseException:
        if name in registry(model):
            delete_adapter(model, name)
        set_adapter(model, previous)
        for p, flag in grads.items():
            p.requires_grad_(flag)
        raise
    return config
